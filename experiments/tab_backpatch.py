"""Table: back-patching results per task (config chosen on the selection split, accuracy on the test split), as markdown."""
from modality_circuits.execution.store import atomic
from modality_circuits.study.cli import experiment
from modality_circuits.study.report import backpatch_table


def draw(folder, tasks):
    table = backpatch_table(folder, tasks)
    with atomic(folder / "backpatch.md") as tmp, open(tmp, "w") as f:
        f.write(table)
    return table


if __name__ == "__main__":
    experiment(__doc__, ("backpatch",), draw)
