#!/usr/bin/env bash
# Mutation testing of the formula code (mutmut 3, `pip install -e .[dev]`): which changes to the formulas the tests
# notice. Configuration: [tool.mutmut] in pyproject.toml (files mutated, the fast targeted test subset).
# Notes on the mutants that survive: scripts/mutation_notes.md.
#
#   bash scripts/mutation.sh                         # every mutant of the configured files
#   bash scripts/mutation.sh 'modality_circuits.circuits.metrics.*'   # only these (mutmut's name globs)
#
# One process, one thread (OMP_NUM_THREADS=1): the tests run tiny models on CPU. Functions decorated with
# @server_body (the nnsight request bodies) are not mutated by mutmut (it skips decorated functions); they are
# checked against plain torch hooks by tests/test_attribution.py and friends, which the subset includes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
unset PYTHONPATH  # mutmut puts mutants/ first on sys.path; the original package must not shadow it
rm -rf mutants
"$PY" -m mutmut run --max-children "${MUTMUT_CHILDREN:-1}" "$@"
"$PY" -m mutmut results --all true > mutants/results.txt || true
grep -c ": killed" mutants/results.txt | sed 's/^/killed: /' || true
grep -E ": (survived|no tests|timeout|suspicious)" mutants/results.txt || true
