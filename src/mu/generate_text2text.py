"""Seed-compatible entry point: `python -m mu.generate_text2text --model_path PATH --device cpu`.

Answers the paper's example question about *The Spanish Curate* with a Mu model, greedy by
default (the paper's script sampled at temperature 0.9: pass --temperature 0.9 --sample).
PATH is the paper's model.pt or a mu model directory. A model without tokenizer files gets the paper's
(Phi-3.5) tokenizer from $MU_DATA/phi3_tokenizer when MU_DATA names a data folder that holds it.
A thin shim over `mu generate`'s functions (`load_for_generation`, `generate_text`) with the paper's flags.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mu.commands.generate import generate_text, load_for_generation
from mu.errors import MuError
from mu.generation import check_generation_args
from mu.tokenizer import load_tokenizer
from mu.utils import DATA_ENV, data_file

logger = logging.getLogger("mu.generate_text2text")

PROMPT = "Answer the following question based only on the context.\n###Question\n{q}\n###Context\n{c}\n###Answer\n"
QUESTION = "What is the conflict the two brothers are fighting over?"
CONTEXT = (
    " Set in Spain, the play deals with a conflict between two brothers over their inheritance. Don Henrique is older "
    "than Don Jamie by a year; under the system of primogeniture, Henrique is the heir to their father's estate. The "
    "late father's will gives Jamie a small income, but Henrique treats his younger brother with rudeness and "
    "condescension, breeding a hostile relationship between the two. The problem is that Henrique and his wife, "
    "Violante, have been married for a dozen years but have no children\u2014leaving Jamie as Henrique's heir.\n"
    "Jamie is a member of a circle of aristocratic friends, which includes a boy named Ascanio. The boy is the son of "
    "poor parents, but is admired for his grace and nobility of character. Among Jamie's friends is Leandro, a lusty "
    "young man who is interested in the beautiful Amaranta. She is the wife of the rapacious lawyer Bartolus; the "
    "attorney keeps his wife closely watched, and Leandro has developed a scheme to seduce her. He masquerades as a "
    "wealthy law student come to take instruction from Bartolus. The go-between in this is Lopez, the local curate "
    "and the title character.\n"
    "Don Henrique, angered over Jamie's status as his heir, makes a radical move to change the situation: he files a "
    "legal suit (Bartolus is his lawyer) to have the boy Ascanio declared his heir. Henrique testifies that before he "
    "married Violante, he was engaged or \"precontracted\" to Ascanio's mother Jacinta, and that the boy is his "
    "natural son. (Like other plays of the era, The Spanish Curate exploits the legal and ethical ambiguity of the "
    "precontract, which in some interpretations was like a demi-marriage...but not quite.) After the child's birth, "
    "Henrique had second thoughts about the social gap between himself and Jacinta, and got the precontract "
    "cancelled. Jacinta can only affirm the basic truth of Henrique's testimony; and on that basis, Henrique wins his "
    "suit. Ascanio is now his legal heir, and Jamie is out.\n"
    "Violante, however, is outraged that Henrique has exposed this shameful affair and effectively thrown her "
    "infertility in her face. She bullies her husband into reversing course and driving Ascanio out of his house; "
    "Henrique offers the boy financial support, but the child returns to Jacinta and his pretended father Octavio. "
    "Violante is not satisfied with this, however; she reveals herself to be a truly ruthless person when she "
    "solicits Jamie to murder both Henrique and Ascanio and so come into his family fortune immediately.\n"
    "Leandro works his way into the trust of Bartolus, and tries to seduce Amaranta; she is tempted by him, but stands "
    "on her virtue and fidelity. When Bartolus finally becomes suspicious, Amaranta can show that she and Leandro "
    "have been in church, and not having a sexual assignation.\n"
    "The plot comes to a head in the final act: Violante meets Jamie and his pretended accomplices for the double "
    "murder\u2014only to have her plot exposed. Henrique is shocked into penitence by the exposure of his wife's "
    "murder plot\u2014and reveals that he and Violante are not actually, fully legally, married after all. Bartolus "
    "too is cowed by his involvement in the matter, and vows to change his ways. Jamie has no problem accepting "
    "Ascanio as his nephew, now that their family relations are better ordered. Massinger ends the play with a "
    "couplet extolling the middle way in marital relations, between too much pliability in a husband (like Henrique) "
    "and too little (like Bartolus)\u2014much like the concluding couplet in Massinger's later play The Picture.\n"
)
HOW_TO_GET_A_MODEL = (
    "the paper's weights are not downloadable from this project: pass its checkpoint (artifacts/models/model.pt of "
    "microsoft/encoder-decoder-slm, via git-lfs) or a model you trained (e.g. `mu train --task squad_v2 ... --out "
    "runs/squad`, then --model_path runs/squad/final)"
)


SEED_NAMES = {"max_new_tokens": "--max_new_tokens", "do_sample": "--sample", "temperature": "--temperature",
              "top_k": "--top_k"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_path", default="artifacts/models/model.pt", help="paper model.pt or mu model directory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokenizer_path", help="tokenizer directory (default: saved with the model, else the paper's)")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample (the paper's script did) instead of greedy")
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--top_k", type=int)
    p.add_argument("--question", default=QUESTION)
    p.add_argument("--context", default=CONTEXT)
    return p.parse_args(argv)


def answer(args) -> str:
    path = Path(args.model_path)
    if not path.exists():
        raise MuError(f"no model at {str(path)!r}: {HOW_TO_GET_A_MODEL}")
    check_generation_args(args.max_new_tokens, args.sample, args.temperature, args.top_k, names=SEED_NAMES)
    model = load_for_generation(str(path), args.tokenizer_path, args.device)
    if model.tokenizer is None:
        default = data_file("phi3_tokenizer")
        if default is None:
            raise MuError(f"{path} has no tokenizer; pass --tokenizer_path DIR (the Phi-3.5 tokenizer), or set "
                          f"{DATA_ENV} to a data folder holding phi3_tokenizer/")
        model.tokenizer = load_tokenizer(default)
    text = PROMPT.format(q=args.question, c=args.context)
    logger.info("Input text: %s", text)
    result, _, seconds = generate_text(model, text, args.max_new_tokens, args.sample, args.temperature, args.top_k)
    logger.info("Output text: %s (%.2fs)", result, seconds)
    return result


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(answer(parse_args(argv)))
    except MuError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
