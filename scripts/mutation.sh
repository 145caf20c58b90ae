#!/usr/bin/env bash
# Mutation testing of the formula code (mutmut 3, `pip install -e .[dev]`): which changes to the formulas the tests
# notice. Configuration: [tool.mutmut] in pyproject.toml (files mutated, the fast targeted test subset).
# Notes on the mutants that survive: scripts/mutation_notes.md.
#
#   bash scripts/mutation.sh                                  # the formula functions listed in FORMULAS below
#   bash scripts/mutation.sh 'modality_circuits.circuits.*'   # these instead (mutmut's mutant-name globs)
#
# One process, one thread (OMP_NUM_THREADS=1): the tests run tiny models on CPU, and the machine is shared, so the
# run is limited to the formula code that fast tests reach: the metrics, the bootstrap, overlap, the interchange
# score, its mapping and random draw, the back-patching grid, circuit selection and resampling (about a second a
# mutant). Plumbing (argument checks, chunking, reprs, I/O) is not mutated, nor is formula code whose tests run
# models for tens of seconds (scripts/mutation_notes.md says which, and what tests it instead). Functions decorated
# with @server_body (the nnsight request bodies, where IG, ablation and back-patching compute) are skipped by mutmut
# (it never mutates decorated functions); tests compare them with plain torch hooks (tests/hooks.py), and the subset
# runs those tests for the undecorated code around them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
unset PYTHONPATH  # mutmut puts mutants/ first on sys.path; the original package must not shadow it
FORMULAS=(
    'modality_circuits.circuits.metrics.*'
    'modality_circuits.circuits.stats.*'
    'modality_circuits.analyses.overlap.*'
    'modality_circuits.analyses.interchange.x_map_span*'
    'modality_circuits.analyses.interchange.x_random_like*'
    'modality_circuits.analyses.interchange.x_margin*'
    'modality_circuits.analyses.interchange.x_readable*'
    'modality_circuits.analyses.interchange.x__faith*'
    'modality_circuits.analyses.interchange.x__norm*'
    'modality_circuits.analyses.interchange.x__score*'
    'modality_circuits.analyses.backpatch.x_default_configs*'
    'modality_circuits.circuits.circuit.x__top_mask*'
    'modality_circuits.circuits.circuit.xǁCircuitǁfrom_scores*'
    'modality_circuits.circuits.circuit.xǁScoresǁper_position*'
    'modality_circuits.circuits.circuit.xǁScoresǁresample*'
)
[ $# -gt 0 ] || set -- "${FORMULAS[@]}"
rm -rf mutants
"$PY" -m mutmut run --max-children "${MUTMUT_CHILDREN:-1}" "$@"
"$PY" -m mutmut results --all true > mutants/results.txt || true
grep -c ": killed" mutants/results.txt | sed 's/^/killed: /' || true
grep -E ": (survived|no tests|timeout|suspicious)" mutants/results.txt || true
