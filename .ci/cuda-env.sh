# Sourced by .ci/run: the environment for compiling candle's `cuda` feature without a GPU.
#   . .ci/cuda-env.sh        (installs the toolkit on first use)
cuda_root=$(.ci/install-cuda.sh)
export PATH="$cuda_root/bin:$PATH" CUDA_ROOT="$cuda_root" CUDA_PATH="$cuda_root"
export CUDA_HOME="$cuda_root" CUDA_TOOLKIT_ROOT_DIR="$cuda_root"
# No GPU to ask: compile candle's kernels for one compute capability only (Ampere, sm_80).
export CUDA_COMPUTE_CAP=80
# candle-kernels' build compiles its kernels with cudaforge, which would use half the cores.
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"
