//! NVLink multicast ("NVLS", NVLink SHARP) stays off in every qtrain process that
//! uses NCCL: `NCCL_NVLS_ENABLE=0` unless the user set the variable.
//!
//! Why: on NVSwitch machines NCCL would otherwise build its all-reduce on NVLink
//! multicast objects, which live in the switch fabric rather than in one process.
//! On shared GPUs (machines lent between jobs, containers, MIG) a run that dies
//! with such objects allocated, or a fabric-manager hiccup, can leave GPUs out of
//! service until an administrator resets them, and NVLS also reserves a sizeable
//! amount of device memory per communicator. LoRA gradients are small (tens of
//! MB even on a 7B model), so the all-reduce is a small part of a step with or
//! without multicast, and qtrain does not take that risk; the scaling
//! targets are to be measured with NVLS off. A user who owns the machine can opt
//! in with `NCCL_NVLS_ENABLE=1`.
//!
//! NCCL reads the variable when a communicator is created, so it must be in the
//! environment before `crate::nccl` (feature `cuda`) initializes; the launcher sets it for its
//! workers and the NCCL backend sets it in-process for workers started by other
//! launchers (torchrun).

/// The variable NCCL reads.
pub const NVLS_VAR: &str = "NCCL_NVLS_ENABLE";

/// Sets `NCCL_NVLS_ENABLE=0` in this process unless it is set; returns whether it
/// did. Call it before any thread that might read the environment concurrently
/// is started (the NCCL backend calls it first thing in its `init`).
pub fn disable_nvls_unless_set() -> bool {
    if std::env::var_os(NVLS_VAR).is_some() {
        return false;
    }
    // Editions before 2024 keep `set_var` safe; the caller contract above is what
    // makes it sound (no concurrent getenv while it runs).
    std::env::set_var(NVLS_VAR, "0");
    true
}
