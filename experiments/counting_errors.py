"""Confusion matrix of the embedded model's counting answers (true count x predicted token).

    python experiments/counting_errors.py --modality text --n 300
"""
import argparse
from collections import Counter

from modality_circuits.data.pairs import chat_text, encode
from modality_circuits.methods.predict import predicted
from modality_circuits.tasks import sample_pairs
from modality_circuits.zoo import load_model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="toy")
    ap.add_argument("--modality", default="text", choices=("text", "image"))
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args(argv)
    model = load_model(args.model)
    tok = model.processor.tokenizer
    prompts = [p for p, _ in sample_pairs("counting", args.modality, args.n, seed=args.seed, image_size=model.image_size)]
    inputs = [encode(model, [chat_text(model, p)], [p.image] if p.image is not None else None) for p in prompts]
    tokens = tok.convert_ids_to_tokens(predicted(model, inputs).tolist())  # the package's one accuracy rule
    counts = Counter((p.answer, t) for p, t in zip(prompts, tokens))
    preds = sorted({b for _, b in counts})
    print(f"{args.modality} counting, {args.n} prompts: rows = true count, columns = predicted token")
    print("true\\pred " + " ".join(f"{b:>4}" for b in preds))
    for a in sorted({a for a, _ in counts}):
        print(f"{a:>9} " + " ".join(f"{counts[(a, b)]:>4}" for b in preds))
    print(f"accuracy {sum(v for (a, b), v in counts.items() if a == b) / args.n:.3f}")


if __name__ == "__main__":
    main()
