//! Compiles the kernels of `src/ops/*/*.cu` to PTX when the `cuda` feature is on
//! (see `build_ptx.rs`, shared with qtrain-optim's build script).

#[path = "build_ptx.rs"]
mod build_ptx;

fn main() {
    build_ptx::compile_kernels("src/ops", "src/ops");
}
