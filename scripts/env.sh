# Sourced by the Makefile and CI: one stable environment for torch-sys, so its
# C++ shim is built once and never rebuilt because a variable changed.
export KD_CACHE="${KD_CACHE:-$HOME/.cache/kd}"
export VIRTUAL_ENV="$KD_CACHE/venv"
export PATH="$VIRTUAL_ENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
unset LIBTORCH LIBTORCH_LIB LIBTORCH_INCLUDE
# Test binaries are linked like the `kd` binary but carry no rpath of their own.
if [ -d "$VIRTUAL_ENV" ]; then
  _kd_torch_lib="$(ls -d "$VIRTUAL_ENV"/lib/python3*/site-packages/torch/lib 2>/dev/null | head -n1)"
  [ -n "$_kd_torch_lib" ] && export LD_LIBRARY_PATH="$_kd_torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
