//! Keyed fingerprints: HMAC-SHA256(key, credential bytes), first 16 bytes in hex.
//!
//! A fingerprint lets the same credential be recognised across requests, nodes and days
//! without ever keeping the credential. The key makes fingerprints useless to anyone who does
//! not hold it (a plain hash of a short API key could be brute-forced).

use std::{
    fs,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
};

use anyhow::{Context, Result, bail};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

pub const KEY_LEN: usize = 32;

pub struct Fingerprinter {
    /// HMAC with the key already absorbed (inner and outer pads hashed once): each
    /// fingerprint clones it instead of hashing the key again, two SHA-256 blocks saved.
    keyed: Hmac<Sha256>,
}

impl Fingerprinter {
    pub fn from_key(key: &[u8]) -> Self {
        // Only the hashed pad states are kept, never the key bytes themselves.
        Fingerprinter {
            keyed: <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length"),
        }
    }

    /// Reads the key file (hex), creating it with a fresh random key, mode 0600, if absent.
    pub fn load_or_create(path: &Path) -> Result<Self> {
        match fs::read_to_string(path) {
            Ok(text) => {
                let text = Zeroizing::new(text);
                let mode = fs::metadata(path)?.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    bail!(
                        "fingerprint key {} has mode {mode:o}: make it 0600",
                        path.display()
                    );
                }
                let key = Zeroizing::new(
                    hex::decode(text.trim())
                        .with_context(|| format!("{} is not hex", path.display()))?,
                );
                if key.len() < 16 {
                    bail!(
                        "fingerprint key {} is shorter than 16 bytes",
                        path.display()
                    );
                }
                Ok(Self::from_key(&key))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    fs::create_dir_all(dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                }
                let mut key = Zeroizing::new(vec![0u8; KEY_LEN]);
                getrandom::fill(&mut key).map_err(|e| anyhow::anyhow!("getrandom: {e}"))?;
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .with_context(|| format!("creating {}", path.display()))?;
                let text = Zeroizing::new(hex::encode(&*key));
                f.write_all(text.as_bytes())?;
                f.write_all(b"\n")?;
                f.sync_all()?;
                tracing::info!(path = %path.display(), "created a new fingerprint key");
                Ok(Self::from_key(&key))
            }
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub fn fingerprint(&self, secret: &[u8]) -> String {
        let mut mac = self.keyed.clone();
        mac.update(secret);
        hex::encode(&mac.finalize().into_bytes()[..16])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_is_created_0600_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/key");
        let a = Fingerprinter::load_or_create(&path).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let b = Fingerprinter::load_or_create(&path).unwrap();
        assert_eq!(a.fingerprint(b"tok"), b.fingerprint(b"tok"));
        assert_ne!(a.fingerprint(b"tok"), a.fingerprint(b"tok2"));
        assert_eq!(a.fingerprint(b"tok").len(), 32);
    }

    #[test]
    fn known_vector() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let f = Fingerprinter::from_key(b"Jefe");
        assert_eq!(
            f.fingerprint(b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c7"
        );
    }

    #[test]
    fn loose_permissions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        fs::write(&path, "00112233445566778899aabbccddeeff\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(Fingerprinter::load_or_create(&path).is_err());
    }
}
