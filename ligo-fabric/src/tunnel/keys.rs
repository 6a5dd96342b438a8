//! WireGuard key files: read only when nobody but the owner can read them,
//! and never shown anywhere (errors name the file, not its content).

use std::{
    fmt,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
};

use anyhow::{bail, Context, Result};

use crate::config::decode_key;

/// A secret key. `Debug` prints nothing of it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey(pub [u8; 32]);

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// Reads a base64 key from `path`, refusing a file that anyone but its
/// owner (us or root) and the root group may read, or that anyone but the
/// owner may write. `field` names the config field in errors.
pub fn read_key_file(path: &Path, field: &str) -> Result<SecretKey> {
    // Opened once and checked through the handle, so the file checked is
    // the file read even while Kubernetes swaps a Secret mount's `..data`
    // link (opening follows it).
    let cannot_read = || format!("{field}: cannot read {}", path.display());
    let mut file = std::fs::File::open(path).with_context(cannot_read)?;
    let meta = file.metadata().with_context(cannot_read)?;
    let mode = meta.permissions().mode() & 0o777;
    let exposure = key_file_exposure(
        mode,
        meta.uid(),
        meta.gid(),
        nix::unistd::geteuid().as_raw(),
    )
    .or_else(|| {
        (mode & 0o070 != 0 && has_access_acl(&file)).then(|| {
            "has an access ACL, so its group bits do not say who can read the key".to_owned()
        })
    });
    if let Some(problem) = exposure {
        let fix = if meta.uid() != 0 && meta.uid() != nix::unistd::geteuid().as_raw() {
            format!("run `chown root {}`", path.display())
        } else {
            format!(
                "run `chmod 600 {}` (in Kubernetes, mount the Secret with defaultMode: 0400 and no fsGroup on the pod)",
                path.display()
            )
        };
        bail!("{field}: {} {problem}; {fix}", path.display());
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut file, &mut text).with_context(cannot_read)?;
    match decode_key(&text) {
        Some(key) => Ok(SecretKey(key)),
        None => bail!(
            "{field}: {} does not hold a base64 WireGuard key (as `wg genkey` writes)",
            path.display()
        ),
    }
}

/// Whether `file` carries a POSIX access ACL: then its group mode bits are
/// the ACL's mask, not the group's rights, and others may be named in it.
fn has_access_acl(file: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd;
    const NAME: &[u8] = b"system.posix_acl_access\0";
    // SAFETY: a size query (null buffer, length 0) on a descriptor we own,
    // with a NUL-terminated name.
    let size = unsafe {
        libc::fgetxattr(
            file.as_raw_fd(),
            NAME.as_ptr().cast(),
            std::ptr::null_mut(),
            0,
        )
    };
    size > 0
}

/// Why a key file with this mode and ownership lets someone other than us
/// reach the key, or `None` when it does not. Group read is allowed only
/// for the root group (`defaultMode: 0440` on a root-owned Secret mount);
/// any other group could be shared with other workloads (`fsGroup`).
fn key_file_exposure(mode: u32, owner: u32, group: u32, euid: u32) -> Option<String> {
    if owner != euid && owner != 0 {
        return Some(format!("is owned by uid {owner}, neither us nor root"));
    }
    if mode & 0o007 != 0 {
        return Some(format!("has mode {mode:03o}, so others can reach the key"));
    }
    if mode & 0o020 != 0 {
        return Some(format!(
            "has mode {mode:03o}, so its group can change the key"
        ));
    }
    if mode & 0o050 != 0 && group != 0 {
        return Some(format!(
            "has mode {mode:03o} and group {group}, so members of that group can read the key"
        ));
    }
    None
}

/// The public key of a private key, base64 (as `wg pubkey` prints it).
pub fn public_key_base64(public: &[u8; 32]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(public)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    fn write(path: &Path, mode: u32, text: &str) {
        let _ = std::fs::remove_file(path);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .mode(mode)
            .open(path)
            .unwrap();
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn key_files_must_be_private_and_are_never_echoed() {
        let dir = std::env::temp_dir().join(format!("ligo-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("private.key");
        let key = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";

        write(&path, 0o600, &format!("{key}\n"));
        let read = read_key_file(&path, "gateway.private_key_file").unwrap();
        assert_eq!(public_key_base64(&read.0), key, "round trip");
        assert_eq!(format!("{read:?}"), "SecretKey(<redacted>)");

        write(&path, 0o644, key);
        let e = format!(
            "{:#}",
            read_key_file(&path, "gateway.private_key_file").unwrap_err()
        );
        assert!(e.starts_with("gateway.private_key_file: "), "{e}");
        assert!(
            e.contains("mode 644") && e.contains("chmod 600") && e.contains("defaultMode: 0400"),
            "{e}"
        );
        assert!(!e.contains(key), "the key leaked into {e}");

        write(&path, 0o600, "not-a-key");
        let e = format!("{:#}", read_key_file(&path, "f").unwrap_err());
        assert!(e.contains("does not hold a base64 WireGuard key"), "{e}");
        assert!(!e.contains("not-a-key"), "content leaked into {e}");

        let e = format!(
            "{:#}",
            read_key_file(&dir.join("missing"), "f").unwrap_err()
        );
        assert!(e.starts_with("f: cannot read"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// What a Kubernetes Secret mount produces, by defaultMode and owner.
    #[test]
    fn secret_mount_modes_are_accepted_only_where_nobody_else_reads() {
        const ROOT: u32 = 0;
        const FS_GROUP: u32 = 2000;
        let accepted = [
            (0o600, ROOT, ROOT),
            (0o400, ROOT, ROOT),
            (0o440, ROOT, ROOT),
            (0o400, ROOT, FS_GROUP),
        ];
        for (mode, owner, group) in accepted {
            assert_eq!(
                key_file_exposure(mode, owner, group, ROOT),
                None,
                "{mode:o} {owner}:{group}"
            );
        }
        let refused = [
            (0o644, ROOT, ROOT, "others can reach"),
            (0o604, ROOT, ROOT, "others can reach"),
            (0o460, ROOT, ROOT, "group can change"),
            (0o440, ROOT, FS_GROUP, "group 2000, so members"),
            (0o400, 1000, ROOT, "owned by uid 1000"),
        ];
        for (mode, owner, group, why) in refused {
            let problem = key_file_exposure(mode, owner, group, ROOT)
                .unwrap_or_else(|| panic!("accepted {mode:o} {owner}:{group}"));
            assert!(problem.contains(why), "{problem}");
        }
        // A daemon running as uid 1000 may read its own 0400 file.
        assert_eq!(key_file_exposure(0o400, 1000, 1000, 1000), None);
    }
}
