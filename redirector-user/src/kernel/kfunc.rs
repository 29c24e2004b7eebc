//! What the reset iterator (redirector-ebpf/src/reset.rs) needs from the running kernel that
//! the loader cannot give it: the BTF id of the kernel function `bpf_sock_destroy` and the
//! offsets of the `struct sock_common` fields it reads.
//!
//! aya 0.14 relocates maps, globals and BPF-to-BPF calls but not kernel-function calls, so the
//! program calls a placeholder helper number and [`patch_sock_destroy`] rewrites that one
//! instruction into a kernel-function call (`BPF_PSEUDO_KFUNC_CALL`, the function's id in
//! vmlinux BTF) before the object is loaded, which is what a loader with kfunc support does.
use std::{borrow::Cow, path::Path};

use btf_rs::{Btf, Type};

/// vmlinux BTF, where the kernel describes its functions and types.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The placeholder call in the program: `call 0x7ead0001` (redirector-ebpf's
/// `SOCK_DESTROY_PLACEHOLDER`), encoded as the BPF instruction bytes the compiler emits.
const PLACEHOLDER_CALL: [u8; 8] = {
    let imm = 0x7ead_0001u32.to_le_bytes();
    [0x85, 0x00, 0x00, 0x00, imm[0], imm[1], imm[2], imm[3]]
};

/// `src_reg` of a call to a kernel function (uapi `BPF_PSEUDO_KFUNC_CALL`), in the high
/// nibble of the register byte.
const PSEUDO_KFUNC_CALL_REGS: u8 = 2 << 4;

#[derive(Debug, thiserror::Error)]
pub enum KfuncError {
    #[error("cannot read the kernel's BTF at {VMLINUX_BTF}: {0}")]
    Btf(String),
    #[error("the kernel has no {0} (socket destroy for BPF iterators needs Linux 6.5 or later)")]
    Missing(&'static str),
    #[error("the kernel's struct sock_common has no field {0}")]
    Field(&'static str),
    #[error(
        "the programs carry {0} placeholder calls for bpf_sock_destroy, not one (build mismatch)"
    )]
    Placeholder(usize),
}

/// Offsets of the `struct sock_common` fields the iterator reads, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SockCommonOffsets {
    pub daddr: u32,
    pub dport: u32,
    pub family: u32,
    pub v6_daddr: u32,
}

/// What the running kernel says about socket destroy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SockDestroy {
    /// BTF id of `bpf_sock_destroy` in vmlinux.
    pub btf_id: u32,
    pub offsets: SockCommonOffsets,
}

impl SockDestroy {
    /// Reads the facts from the running kernel's BTF.
    pub fn probe() -> Result<SockDestroy, KfuncError> {
        Self::from_btf_file(Path::new(VMLINUX_BTF))
    }

    fn from_btf_file(path: &Path) -> Result<SockDestroy, KfuncError> {
        let btf = Btf::from_file(path).map_err(|e| KfuncError::Btf(e.to_string()))?;
        let btf_id = function_id(&btf, "bpf_sock_destroy")?;
        // Without the TCP iterator there is nothing to call it from.
        function_id(&btf, "bpf_iter_tcp")?;
        let field = |name| field_offset(&btf, "sock_common", name);
        Ok(SockDestroy {
            btf_id,
            offsets: SockCommonOffsets {
                daddr: field("skc_daddr")?,
                dport: field("skc_dport")?,
                family: field("skc_family")?,
                v6_daddr: field("skc_v6_daddr")?,
            },
        })
    }
}

/// The object with its one placeholder call turned into a call of `bpf_sock_destroy`.
pub fn patch_sock_destroy(object: &[u8], btf_id: u32) -> Result<Cow<'_, [u8]>, KfuncError> {
    let at: Vec<usize> = object
        .windows(PLACEHOLDER_CALL.len())
        .enumerate()
        .filter(|(offset, window)| offset % 8 == 0 && *window == PLACEHOLDER_CALL)
        .map(|(offset, _)| offset)
        .collect();
    let [at] = at[..] else {
        return Err(KfuncError::Placeholder(at.len()));
    };
    let mut patched = object.to_vec();
    patched[at + 1] = PSEUDO_KFUNC_CALL_REGS;
    patched[at + 4..at + 8].copy_from_slice(&btf_id.to_le_bytes());
    Ok(Cow::Owned(patched))
}

fn function_id(btf: &Btf, name: &'static str) -> Result<u32, KfuncError> {
    let ids = btf
        .resolve_ids_by_name(name)
        .map_err(|_| KfuncError::Missing(name))?;
    ids.into_iter()
        .find(|id| matches!(btf.resolve_type_by_id(*id), Ok(Type::Func(_))))
        .ok_or(KfuncError::Missing(name))
}

/// Byte offset of `field` in `structure`, looking through anonymous unions and structs (where
/// `sock_common` keeps most of its fields).
fn field_offset(btf: &Btf, structure: &str, field: &'static str) -> Result<u32, KfuncError> {
    let root = btf
        .resolve_types_by_name(structure)
        .map_err(|_| KfuncError::Field(field))?
        .into_iter()
        .find_map(|t| match t {
            Type::Struct(s) => Some(s),
            _ => None,
        })
        .ok_or(KfuncError::Field(field))?;
    // Depth-first over anonymous members; sock_common nests two levels deep.
    let mut pending = vec![(root, 0u32)];
    let mut visited = 0;
    while let Some((current, base)) = pending.pop() {
        visited += 1;
        if visited > 64 {
            break;
        }
        for member in &current.members {
            let offset = base + member.bit_offset() / 8;
            let name = btf.resolve_name(member).unwrap_or_default();
            if name == field {
                return Ok(offset);
            }
            if name.is_empty()
                && let Ok(Type::Struct(inner) | Type::Union(inner)) =
                    btf.resolve_chained_type(member)
            {
                pending.push((inner, offset));
            }
        }
    }
    Err(KfuncError::Field(field))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_placeholder_becomes_a_kernel_function_call() {
        let mut object = vec![0u8; 32];
        object[16..24].copy_from_slice(&PLACEHOLDER_CALL);
        let patched = patch_sock_destroy(&object, 65_750).unwrap();
        assert_eq!(
            patched[16..24],
            [0x85, 0x20, 0, 0, 0xd6, 0x00, 0x01, 0x00],
            "call with src_reg 2 and the BTF id as immediate"
        );
        assert_eq!(patched[..16], object[..16]);
        assert_eq!(patched[24..], object[24..]);
    }

    #[test]
    fn no_placeholder_or_several_is_a_build_mismatch() {
        assert!(matches!(
            patch_sock_destroy(&[0u8; 32], 1),
            Err(KfuncError::Placeholder(0))
        ));
        let twice = [PLACEHOLDER_CALL, PLACEHOLDER_CALL].concat();
        assert!(matches!(
            patch_sock_destroy(&twice, 1),
            Err(KfuncError::Placeholder(2))
        ));
        // Bytes that only look like the call off an instruction boundary are not it.
        let mut unaligned = vec![0u8; 24];
        unaligned[3..11].copy_from_slice(&PLACEHOLDER_CALL);
        assert!(matches!(
            patch_sock_destroy(&unaligned, 1),
            Err(KfuncError::Placeholder(0))
        ));
    }

    #[test]
    fn the_embedded_programs_carry_exactly_one_placeholder() {
        let patched = patch_sock_destroy(super::super::programs::EBPF_OBJECT, 7).unwrap();
        assert_ne!(patched.as_ref(), super::super::programs::EBPF_OBJECT);
    }

    /// A kernel whose BTF has no `bpf_sock_destroy` (before 6.5) is told apart, with the reason
    /// the daemon logs at start, rather than failing the load. The programs' own BTF stands in
    /// for such a kernel's: the same format, without the function.
    #[test]
    fn a_kernel_without_socket_destroy_is_a_clear_error() {
        use object::{Object as _, ObjectSection as _};
        let elf = object::File::parse(super::super::programs::EBPF_OBJECT).unwrap();
        let btf = elf.section_by_name(".BTF").expect("the programs carry BTF");
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), btf.data().unwrap()).unwrap();
        let err = SockDestroy::from_btf_file(file.path()).unwrap_err();
        assert!(
            matches!(err, KfuncError::Missing("bpf_sock_destroy")),
            "{err:?}"
        );
        assert!(err.to_string().contains("Linux 6.5"), "{err}");
        let unreadable = SockDestroy::from_btf_file(Path::new("/nonexistent/btf")).unwrap_err();
        assert!(matches!(unreadable, KfuncError::Btf(_)), "{unreadable:?}");
    }

    /// Against this machine's kernel: the fields the iterator reads exist where x86-64 kernels
    /// have long kept them. Skipped only where the kernel publishes no BTF.
    #[test]
    fn sock_common_offsets_come_from_the_running_kernel() {
        if !Path::new(VMLINUX_BTF).exists() {
            assert!(
                std::env::var_os("CI").is_none(),
                "no {VMLINUX_BTF} under CI=true"
            );
            return;
        }
        let btf = Btf::from_file(VMLINUX_BTF).unwrap();
        assert_eq!(field_offset(&btf, "sock_common", "skc_daddr").unwrap(), 0);
        assert_eq!(field_offset(&btf, "sock_common", "skc_dport").unwrap(), 12);
        assert_eq!(field_offset(&btf, "sock_common", "skc_family").unwrap(), 16);
        assert!(matches!(
            field_offset(&btf, "sock_common", "no_such_field"),
            Err(KfuncError::Field("no_such_field"))
        ));
    }
}
