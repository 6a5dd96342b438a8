//! The gateway's WireGuard key pair: generated into a Secret when missing,
//! read back from it. The private key never leaves the Secret (the
//! gateway's tunnel process mounts it); the public key goes into
//! `ClusterFabric` status for peers.

use base64::{engine::general_purpose::STANDARD, Engine as _};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::cluster::KeyState;

/// The Secret in the control plane's namespace.
pub const GATEWAY_KEY_SECRET: &str = "ligo-gateway-key";
/// Its data keys (also the file names where it is mounted).
pub const PRIVATE_KEY_FIELD: &str = "private-key";
pub const PUBLIC_KEY_FIELD: &str = "public-key";

/// A fresh key pair, base64 as `wg genkey | wg pubkey` prints them.
pub fn generate() -> Result<(String, String), getrandom::Error> {
    let mut secret = [0u8; 32];
    getrandom::getrandom(&mut secret)?;
    let private = StaticSecret::from(secret);
    let public = PublicKey::from(&private);
    Ok((
        STANDARD.encode(private.to_bytes()),
        STANDARD.encode(public.as_bytes()),
    ))
}

/// What the Secret's `private-key` (decoded from the Secret's data) holds.
pub fn key_state(namespace: &str, private_key: Option<&[u8]>) -> KeyState {
    let Some(raw) = private_key else {
        return KeyState::Missing;
    };
    let invalid = || {
        KeyState::Invalid(format!(
            "Secret {namespace}/{GATEWAY_KEY_SECRET} data.{PRIVATE_KEY_FIELD} is not a base64 WireGuard private key; delete the Secret to have a new key generated"
        ))
    };
    let Ok(text) = std::str::from_utf8(raw) else {
        return invalid();
    };
    let Ok(bytes) = STANDARD.decode(text.trim()) else {
        return invalid();
    };
    let Ok(secret) = <[u8; 32]>::try_from(bytes.as_slice()) else {
        return invalid();
    };
    let public = PublicKey::from(&StaticSecret::from(secret));
    KeyState::Present {
        public_key: STANDARD.encode(public.as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_reads_back_with_its_public_half() {
        let (private, public) = generate().expect("randomness");
        assert_eq!(
            key_state("ligo-system", Some(private.as_bytes())),
            KeyState::Present { public_key: public }
        );
    }

    #[test]
    fn a_known_pair_matches_an_independent_derivation() {
        // RFC 7748 section 6.1: Alice's private key and public key.
        let alice_private = "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=";
        let alice_public = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";
        assert_eq!(
            key_state("ns", Some(alice_private.as_bytes())),
            KeyState::Present {
                public_key: alice_public.into()
            }
        );
    }

    #[test]
    fn missing_and_unusable_keys_are_told_apart() {
        assert_eq!(key_state("ns", None), KeyState::Missing);
        match key_state("ns", Some(b"not a key")) {
            KeyState::Invalid(why) => assert!(why.contains("ns/ligo-gateway-key"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}
