//! Keyed fingerprints: HMAC-SHA256(key, credential bytes), first 16 bytes in hex.
//!
//! A fingerprint lets the same credential be recognised across requests, nodes and days
//! without ever keeping the credential. The key makes fingerprints useless to anyone who does
//! not hold it (a plain hash of a short API key could be brute-forced).

use std::{
    fs,
    io::{Read, Write},
    os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

pub const KEY_LEN: usize = 32;

/// Largest key file read: 32 bytes are 64 hex digits and a newline; this leaves room for
/// keys up to 127 bytes and CR LF.
pub const MAX_KEY_FILE: u64 = 256;

/// Why the fingerprint key could not be loaded. Never holds key bytes.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("opening fingerprint key {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("fingerprint key {} is a {kind}, not a regular file", path.display())]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error(
        "fingerprint key {} is {size} bytes or more: a key file holds the key in hex and a newline (at most {MAX_KEY_FILE} bytes; {} for a {KEY_LEN}-byte key)",
        path.display(), 2 * KEY_LEN + 1
    )]
    TooLarge { path: PathBuf, size: u64 },
    #[error("fingerprint key {} has mode {mode:o}: make it 0600", path.display())]
    Mode { path: PathBuf, mode: u32 },
    #[error("fingerprint key {} is not hex", path.display())]
    NotHex { path: PathBuf },
    #[error("fingerprint key {} is shorter than 16 bytes", path.display())]
    TooShort { path: PathBuf },
    #[error("reading fingerprint key {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("creating fingerprint key {}: {source}", path.display())]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("getrandom: {0}")]
    Random(String),
}

fn file_kind(t: fs::FileType) -> &'static str {
    if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_socket() {
        "socket"
    } else {
        "special file"
    }
}

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
    /// Only a regular file of at most [`MAX_KEY_FILE`] bytes is read: opened non-blocking
    /// and checked on its fd, so a FIFO cannot hang the start nor `/dev/zero` fill memory.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyFileError> {
        let p = || path.to_path_buf();
        let f = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
            .open(path);
        let mut f = match f {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Self::create(path),
            Err(source) => return Err(KeyFileError::Open { path: p(), source }),
        };
        let meta = f
            .metadata()
            .map_err(|source| KeyFileError::Read { path: p(), source })?;
        if !meta.file_type().is_file() {
            return Err(KeyFileError::NotRegular {
                path: p(),
                kind: file_kind(meta.file_type()),
            });
        }
        if meta.len() > MAX_KEY_FILE {
            return Err(KeyFileError::TooLarge {
                path: p(),
                size: meta.len(),
            });
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyFileError::Mode { path: p(), mode });
        }
        // Bounded again while reading: the file may grow after fstat.
        let mut text = Zeroizing::new(Vec::with_capacity(MAX_KEY_FILE as usize + 1));
        (&mut f)
            .take(MAX_KEY_FILE + 1)
            .read_to_end(&mut text)
            .map_err(|source| KeyFileError::Read { path: p(), source })?;
        if text.len() as u64 > MAX_KEY_FILE {
            return Err(KeyFileError::TooLarge {
                path: p(),
                size: text.len() as u64,
            });
        }
        let key = Zeroizing::new(
            hex::decode(text.trim_ascii()).map_err(|_| KeyFileError::NotHex { path: p() })?,
        );
        if key.len() < 16 {
            return Err(KeyFileError::TooShort { path: p() });
        }
        Ok(Self::from_key(&key))
    }

    fn create(path: &Path) -> Result<Self, KeyFileError> {
        let create = |source| KeyFileError::Create {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(|source| KeyFileError::Create {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let mut key = Zeroizing::new(vec![0u8; KEY_LEN]);
        getrandom::fill(&mut key).map_err(|e| KeyFileError::Random(e.to_string()))?;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(create)?;
        let text = Zeroizing::new(hex::encode(&*key));
        f.write_all(text.as_bytes()).map_err(create)?;
        f.write_all(b"\n").map_err(create)?;
        f.sync_all().map_err(create)?;
        tracing::info!(path = %path.display(), "created a new fingerprint key");
        Ok(Self::from_key(&key))
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
    fn special_and_oversized_key_files_are_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let err = |p: &Path| Fingerprinter::load_or_create(p).err().expect("refused");
        // Would fill memory if read whole.
        let zero = err(Path::new("/dev/zero"));
        assert!(
            matches!(
                zero,
                KeyFileError::NotRegular {
                    kind: "character device",
                    ..
                }
            ),
            "{zero}"
        );
        // Would block the start forever if opened blocking or read.
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let (tx, rx) = std::sync::mpsc::channel();
        let f2 = fifo.clone();
        std::thread::spawn(move || tx.send(err(&f2).to_string()).unwrap());
        let msg = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("a FIFO key file must not block");
        assert!(msg.contains("is a FIFO, not a regular file"), "{msg}");
        let d = err(dir.path());
        assert!(d.to_string().contains("directory"), "{d}");
        let big = dir.path().join("big");
        fs::write(&big, "00".repeat(4096)).unwrap();
        fs::set_permissions(&big, fs::Permissions::from_mode(0o600)).unwrap();
        let e = err(&big);
        assert!(
            matches!(e, KeyFileError::TooLarge { size: 8192, .. }),
            "{e}"
        );
        // A key written as `openssl rand -hex 32` writes it still loads.
        let ok = dir.path().join("ok");
        fs::write(&ok, format!("{}\n", "ab".repeat(KEY_LEN))).unwrap();
        fs::set_permissions(&ok, fs::Permissions::from_mode(0o600)).unwrap();
        Fingerprinter::load_or_create(&ok).unwrap();
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
