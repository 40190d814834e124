//! Compiles the fused AdamW kernel `src/device/adamw8bit.cu` to PTX when the `cuda`
//! feature is on, with qtrain-device's build helper and its `common.cuh`.

#[path = "../qtrain-device/build_ptx.rs"]
mod build_ptx;

fn main() {
    build_ptx::compile_kernels("src/device", "../qtrain-device/src/ops");
}
