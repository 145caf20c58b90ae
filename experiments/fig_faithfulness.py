"""Figure: faithfulness curves of textual and visual circuits per task, with the smallest faithful circuit."""
from modality_circuits.study import figures
from modality_circuits.study.cli import experiment

if __name__ == "__main__":
    experiment(__doc__, ("curve",), figures.faithfulness_curves)
