"""Figure: each task's textual prompt (chat template included) beside its rendered image prompt."""
import argparse

from modality_circuits import figures, tasks
from modality_circuits.models import load_model
from modality_circuits.store import model_dir

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="toy")
    p.add_argument("--tasks", nargs="+", default=list(tasks.TASKS), choices=tasks.TASKS)
    p.add_argument("--out", default="results")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    model = load_model(args.model)
    print(figures.gallery(model, model_dir(args.out, model.name), args.tasks, seed=args.seed))
