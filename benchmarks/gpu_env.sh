# Sourced by benchmarks/gpu_check.sh and benchmarks/graded_gpu.sh: the Python to use and, on the GPU
# machine (CPU unset), the wheels of benchmarks/gpu_wheels.sh (.whl/, carried with the working tree)
# installed into /tmp/site as the device notes say: no index, no dependencies, one version of each.
# The wheels are Python 3.12 builds: a CPU run uses this checkout's venv as it is.
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [ -z "${CPU:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || { echo "installing the wheels of .whl/ failed" >&2; exit 3; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
