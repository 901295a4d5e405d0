"""One module per `mu` verb: `add_arguments(parser)` and `run(args)`, thin over the library."""
