"""Figure: where each task's textual and visual circuits sit, per layer and prompt token, and per image patch."""
from modality_circuits.study import figures
from modality_circuits.study.cli import experiment


def draw(study, tasks):
    return figures.circuit_maps(study.model, study.dir, tasks, data_dir=study.data_dir)


if __name__ == "__main__":
    experiment(__doc__, ("curve",), draw, study=True)
