//! Compiles the kernel programs (redirector-ebpf) for the BPF target with aya-build and leaves
//! the object in OUT_DIR, where src/ebpf.rs embeds it.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == "redirector-ebpf")
        .ok_or_else(|| anyhow!("redirector-ebpf is not in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("redirector-ebpf manifest has no parent"))?;

    // Build the kernel side with the same toolchain as the daemon. That toolchain is stable, so
    // `-Z build-std=core` needs RUSTC_BOOTSTRAP; `cargo xtask setup` installs its rust-src and a
    // bpf-linker built against its LLVM.
    let toolchain = std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "stable".to_owned());
    println!("cargo:rerun-if-env-changed=RUSTUP_TOOLCHAIN");
    if std::env::var_os("RUSTC_BOOTSTRAP").is_none() {
        // SAFETY: build scripts are single-threaded here; the variable is read by the cargo
        // child process aya-build spawns.
        unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    }

    let features: &[&str] = if std::env::var_os("CARGO_FEATURE_EBPF_UPGRADE_PROBE").is_some() {
        &["upgrade-probe"]
    } else {
        &[]
    };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "redirector-ebpf",
            root_dir: root_dir.as_str(),
            no_default_features: false,
            features,
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}
