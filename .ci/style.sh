#!/usr/bin/env bash
# Style check: ruff (lint + format) on the tracked Python files and clang-format on the tracked
# C++/CUDA files, configured by pyproject.toml's [tool.ruff] and .clang-format. Changes nothing;
# fails on the first tool that finds something. To fix: `ruff check --fix`, `ruff format` and
# `clang-format -i FILE` (or `pre-commit run --all-files`, .pre-commit-config.yaml, same versions).
# Usage (repository root): bash .ci/style.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# Pinned: a newer release may format differently (keep .pre-commit-config.yaml's revs in step).
RUFF_VERSION=0.17.6
CLANG_FORMAT_VERSION=23.1.5
echo "+ pip install ruff==$RUFF_VERSION clang-format==$CLANG_FORMAT_VERSION"
python3 -m pip install -q "ruff==$RUFF_VERSION" "clang-format==$CLANG_FORMAT_VERSION"

mapfile -d '' python_files < <(git ls-files -z -- '*.py' '*.pyi')
mapfile -d '' cxx_files < <(git ls-files -z -- '*.c' '*.cc' '*.cpp' '*.h' '*.hpp' '*.cu' '*.cuh')
echo "+ ruff check (${#python_files[@]} files)"
python3 -m ruff check --force-exclude --no-fix "${python_files[@]}"
echo "+ ruff format --check"
python3 -m ruff format --force-exclude --check "${python_files[@]}"
echo "+ clang-format --dry-run -Werror (${#cxx_files[@]} files)"
# The wheel's binary, found through its module (pip's script directory may not be on PATH).
clang_format=$(python3 -c 'import clang_format; print(clang_format.get_executable("clang-format"))')
"$clang_format" --version
"$clang_format" --style=file --dry-run -Werror "${cxx_files[@]}"
echo "+ style: ok"
