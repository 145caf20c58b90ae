"""Figure: each task's textual prompt (chat template included) beside its rendered image prompt."""
import argparse

from modality_circuits import tasks
from modality_circuits.execution.store import model_dir
from modality_circuits.study import figures
from modality_circuits.zoo import load_model

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="toy")
    p.add_argument("--tasks", nargs="+", default=list(tasks.TASKS), choices=tasks.TASKS)
    p.add_argument("--out", default="results")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="folder of the tasks' CSV items and images (as for reproduce)")
    p.add_argument("--image-size", type=int, default=None, help="side of rendered images (default: the model's)")
    args = p.parse_args()
    model = load_model(args.model)
    print(figures.gallery(model, model_dir(args.out, model.name), args.tasks, seed=args.seed, data_dir=args.data_dir,
                          image_size=args.image_size))
