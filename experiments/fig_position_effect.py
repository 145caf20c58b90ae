"""Figure: where each modality does its work — exact effect of patching a whole position, per span D/Q/G."""
from modality_circuits.study import figures
from modality_circuits.study.cli import experiment

if __name__ == "__main__":
    experiment(__doc__, ("curve", "position_effect"), figures.position_effect_bars)
