//! Field checks shared by the reconcilers and the CLI. Each error names the
//! field as a user writes it in YAML (`spec.podCIDR`), and what is wrong.

use std::net::SocketAddrV4;

use base64::Engine as _;
use ipnetwork::Ipv4Network;

/// A problem with one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// As in YAML: `spec.viewPools[1]`.
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

fn error(field: &str, message: String) -> FieldError {
    FieldError {
        field: field.to_owned(),
        message,
    }
}

/// An IPv4 CIDR with no host bits set (`10.244.0.0/16`, not `10.244.1.0/16`).
pub fn cidr(field: &str, text: &str) -> Result<Ipv4Network, FieldError> {
    let net: Ipv4Network = text.trim().parse().map_err(|_| {
        error(
            field,
            format!("{text:?} is not an IPv4 CIDR (write it as 10.244.0.0/16)"),
        )
    })?;
    if net.network() != net.ip() {
        return Err(error(
            field,
            format!(
                "{text:?} has host bits set; the network is {}/{}",
                net.network(),
                net.prefix()
            ),
        ));
    }
    Ok(net)
}

/// Each CIDR of a list, named `field[i]`.
pub fn cidrs(field: &str, texts: &[String]) -> Result<Vec<Ipv4Network>, FieldError> {
    texts
        .iter()
        .enumerate()
        .map(|(i, t)| cidr(&format!("{field}[{i}]"), t))
        .collect()
}

/// An RFC 1123 label: what cluster names are (they also name objects).
pub fn dns_label(field: &str, text: &str) -> Result<(), FieldError> {
    let ok = !text.is_empty()
        && text.len() <= 63
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !text.starts_with('-')
        && !text.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(error(
            field,
            format!("{text:?} is not an RFC 1123 label (lower-case letters, digits and '-', at most 63, starting and ending with a letter or digit)"),
        ))
    }
}

/// The largest cluster id: ids are VXLAN network identifiers (24 bits).
pub const MAX_CLUSTER_ID: u32 = (1 << 24) - 1;

pub fn cluster_id(field: &str, id: u32) -> Result<u32, FieldError> {
    if (1..=MAX_CLUSTER_ID).contains(&id) {
        Ok(id)
    } else {
        Err(error(
            field,
            format!("{id} is out of range: a cluster id is 1..{MAX_CLUSTER_ID} (it is the VNI)"),
        ))
    }
}

/// `ip:port` of a gateway.
pub fn endpoint(field: &str, text: &str) -> Result<SocketAddrV4, FieldError> {
    text.trim()
        .parse()
        .map_err(|_| error(field, format!("{text:?} is not an IPv4 ip:port")))
}

/// A WireGuard public key: 32 bytes, base64.
pub fn wireguard_key(field: &str, text: &str) -> Result<[u8; 32], FieldError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|_| error(field, "is not base64".to_owned()))?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| {
        error(
            field,
            format!(
                "is {} bytes; a WireGuard key is 32 (44 base64 characters)",
                bytes.len()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_field_and_what_to_write() {
        let e = cidr("spec.podCIDR", "10.244.0.0/33").expect_err("prefix 33");
        assert_eq!(e.field, "spec.podCIDR");
        assert!(e.message.contains("10.244.0.0/16"), "{e}");
        let e = cidr("spec.podCIDR", "10.244.1.0/16").expect_err("host bits");
        assert!(e.message.contains("10.244.0.0/16"), "{e}");
        let e = cidrs("spec.viewPools", &["10.0.0.0/8".into(), "nope".into()]).expect_err("bad");
        assert_eq!(e.field, "spec.viewPools[1]");
        assert!(cidr("x", "10.1.0.0/16").is_ok());
    }

    #[test]
    fn labels_ids_endpoints_and_keys() {
        assert!(dns_label("n", "cluster-a1").is_ok());
        for bad in ["", "Prod", "-a", "a-", "a_b", &"a".repeat(64)] {
            assert!(dns_label("n", bad).is_err(), "{bad:?}");
        }
        assert!(cluster_id("i", 0).is_err());
        assert!(cluster_id("i", 1 << 24).is_err());
        assert_eq!(cluster_id("i", (1 << 24) - 1), Ok((1 << 24) - 1));
        assert!(endpoint("e", "203.0.113.2:51820").is_ok());
        assert!(endpoint("e", "203.0.113.2").is_err());
        let key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        assert_eq!(wireguard_key("k", &key), Ok([7u8; 32]));
        let short = base64::engine::general_purpose::STANDARD.encode([7u8; 31]);
        assert!(wireguard_key("k", &short)
            .expect_err("31 bytes")
            .message
            .contains("31 bytes"));
    }
}
