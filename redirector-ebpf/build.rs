//! The eBPF binary is linked by `bpf-linker`, a dependency cargo cannot see: rebuild when it
//! changes so a re-installed linker (for a new LLVM) takes effect.
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => println!("cargo:warning=bpf-linker not found ({err}); run `cargo xtask setup`"),
    }
}
