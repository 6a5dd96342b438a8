//! WireGuard key files: read only when nobody but the owner can read them,
//! and never shown anywhere (errors name the file, not its content).

use std::{fmt, os::unix::fs::PermissionsExt, path::Path};

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

/// Reads a base64 key from `path`, refusing a file that group or others may
/// read or write. `field` names the config field in errors.
pub fn read_key_file(path: &Path, field: &str) -> Result<SecretKey> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("{field}: cannot read {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "{field}: {} has mode {mode:03o}, so group or others can reach the key; run `chmod 600 {}`",
            path.display(),
            path.display()
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{field}: cannot read {}", path.display()))?;
    match decode_key(&text) {
        Some(key) => Ok(SecretKey(key)),
        None => bail!(
            "{field}: {} does not hold a base64 WireGuard key (as `wg genkey` writes)",
            path.display()
        ),
    }
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
        assert!(e.contains("mode 644") && e.contains("chmod 600"), "{e}");
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
}
