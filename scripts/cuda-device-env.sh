# Source this on a GPU machine before running a qtrain built with scripts/cuda-toolchain.sh
# (linked against stubs): it points the dynamic loader at the real CUDA 13 libraries. The
# default paths are those of NVIDIA's CUDA 13 containers (toolkit in /usr/local/cuda,
# driver libraries in /usr/local/nvidia/lib64); set QTRAIN_CUDA_LIBS to override.
#   . scripts/cuda-device-env.sh
export LD_LIBRARY_PATH="${QTRAIN_CUDA_LIBS:-/usr/local/cuda/targets/x86_64-linux/lib:/usr/local/nvidia/lib64:/usr/lib/x86_64-linux-gnu}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
