//! Authenticated deltas: a BLAKE3 keyed MAC over each delta file and its manifest.
//!
//! A delta's trailer checksum finds damage in transit, but anyone who can write the backup
//! host's inbox can recompute it. With a shared secret key (`--key-file` on both
//! `export-delta` and `apply-delta`), the exporting host writes `<delta>.mac` next to the delta,
//! and the backup host refuses, before anything is applied, a delta whose MAC is missing or
//! does not match.
//!
//! # Key file
//!
//! 64 hexadecimal digits (32 bytes), optionally followed by a newline, e.g. made with
//! `head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > key && chmod 600 key`. A key file that
//! its group or others may read, or that is not a regular file, is refused. The key is never
//! printed, logged or written anywhere else.
//!
//! # MAC file
//!
//! `<name>.apd.mac`, text, two lines:
//!
//! ```text
//! delta <64 hex digits>      BLAKE3 keyed hash (the key) of CONTEXT, then every byte of the delta
//! manifest <64 hex digits>   the same over CONTEXT, then every byte of <name>.json
//! ```
//!
//! CONTEXT is `apollo-checkpoint delta MAC v1\n` (for the delta) or `... manifest MAC v1\n`, so
//! one MAC can never stand for the other. `apply-delta` checks the delta's line always, and the
//! manifest's when the manifest lies next to the delta (it does not read the manifest otherwise).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Suffix of a MAC file, after the delta's name.
pub const MAC_SUFFIX: &str = ".mac";
const DELTA_CONTEXT: &[u8] = b"apollo-checkpoint delta MAC v1\n";
const MANIFEST_CONTEXT: &[u8] = b"apollo-checkpoint manifest MAC v1\n";

/// Errors of keys and MACs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MacError {
    /// The key file may be read by others.
    #[error(
        "{path}: the key file may be read by its group or others (mode {mode:o}); make it private: chmod 600 {path}"
    )]
    KeyPermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file does not hold a key.
    #[error(
        "{path}: a key file holds 64 hexadecimal digits (32 bytes), e.g. from `head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'`"
    )]
    KeyFormat {
        /// The key file.
        path: PathBuf,
    },
    /// A delta comes without its MAC file.
    #[error(
        "{delta}: no MAC ({mac} is missing); with --key-file every delta needs the MAC `export-delta --key-file` writes next to it. Nothing was applied"
    )]
    Missing {
        /// The delta.
        delta: PathBuf,
        /// The MAC file expected.
        mac: PathBuf,
    },
    /// A MAC does not match.
    #[error(
        "{path}: its MAC does not match (forged, damaged, or made with another key); nothing was applied"
    )]
    Mismatch {
        /// The delta or manifest.
        path: PathBuf,
    },
    /// An OS error.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// A MAC key. Its `Debug` shows no key material.
#[derive(Clone)]
pub struct Key([u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(<secret>)")
    }
}

impl Key {
    /// Reads a key file (see the module documentation), refusing one others may read.
    pub fn read(path: &Path) -> Result<Key, MacError> {
        use std::os::unix::fs::PermissionsExt;
        let io = |source| MacError::Io {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        let mode = meta.permissions().mode() & 0o777;
        if !meta.is_file() {
            return Err(MacError::KeyFormat {
                path: path.to_path_buf(),
            });
        }
        if mode & 0o077 != 0 {
            return Err(MacError::KeyPermissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        let mut text = Vec::new();
        File::open(path)
            .and_then(|f| f.take(256).read_to_end(&mut text))
            .map_err(io)?;
        let hex = std::str::from_utf8(&text).unwrap_or("").trim();
        parse_hex32(hex)
            .map(Key)
            .ok_or_else(|| MacError::KeyFormat {
                path: path.to_path_buf(),
            })
    }

    /// The MAC of `file`'s bytes under `context`.
    fn mac_of(&self, context: &[u8], file: &Path) -> Result<[u8; 32], MacError> {
        let io = |source| MacError::Io {
            path: file.to_path_buf(),
            source,
        };
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(context);
        let mut f = File::open(file).map_err(io)?;
        h.update_reader(&mut f).map_err(io)?;
        Ok(*h.finalize().as_bytes())
    }

    /// The text of the MAC file of `delta` (and `manifest`, if given).
    pub fn mac_file_text(&self, delta: &Path, manifest: Option<&Path>) -> Result<String, MacError> {
        let mut text = format!(
            "delta {}\n",
            crate::blockhash::hex(&self.mac_of(DELTA_CONTEXT, delta)?)
        );
        if let Some(m) = manifest {
            text += "manifest ";
            text += &crate::blockhash::hex(&self.mac_of(MANIFEST_CONTEXT, m)?);
            text += "\n";
        }
        Ok(text)
    }

    /// Checks `delta` (and its manifest `<name>.json`, when it lies next to it) against the
    /// MAC file next to it.
    pub fn check(&self, delta: &Path) -> Result<(), MacError> {
        let mac_path = mac_path(delta);
        let text = match std::fs::read_to_string(&mac_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(MacError::Missing {
                    delta: delta.to_path_buf(),
                    mac: mac_path,
                });
            }
            Err(source) => {
                return Err(MacError::Io {
                    path: mac_path,
                    source,
                });
            }
        };
        let line = |kind: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(kind)?.strip_prefix(' '))
                .and_then(|h| parse_hex32(h.trim()))
        };
        let expect = |kind: &str, context: &[u8], file: &Path| -> Result<(), MacError> {
            let mismatch = || MacError::Mismatch {
                path: file.to_path_buf(),
            };
            let want = line(kind).ok_or_else(mismatch)?;
            // Compared as `blake3::Hash`es: in constant time.
            if blake3::Hash::from(self.mac_of(context, file)?) == blake3::Hash::from(want) {
                Ok(())
            } else {
                Err(mismatch())
            }
        };
        expect("delta", DELTA_CONTEXT, delta)?;
        let manifest = manifest_path(delta);
        if manifest.exists() {
            expect("manifest", MANIFEST_CONTEXT, &manifest)?;
        }
        Ok(())
    }
}

/// The MAC file of a delta.
pub fn mac_path(delta: &Path) -> PathBuf {
    let mut name = delta.as_os_str().to_os_string();
    name.push(MAC_SUFFIX);
    PathBuf::from(name)
}

/// The manifest of a delta (`<name>.json` for `<name>.apd`).
pub fn manifest_path(delta: &Path) -> PathBuf {
    delta.with_extension("json")
}

fn parse_hex32(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_file(dir: &Path, text: &str, mode: u32) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join("key");
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn keys_are_private_hex_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let hex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
        let k = Key::read(&key_file(dir.path(), &format!("{hex}\n"), 0o600)).unwrap();
        assert_eq!(format!("{k:?}"), "Key(<secret>)");
        let e = Key::read(&key_file(dir.path(), hex, 0o644)).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
        assert!(!e.to_string().contains(hex));
        for bad in [
            "abc",
            &hex[..62],
            &format!("{hex}00"),
            "zz".repeat(32).as_str(),
        ] {
            let e = Key::read(&key_file(dir.path(), bad, 0o600)).unwrap_err();
            assert!(matches!(e, MacError::KeyFormat { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn a_mac_binds_the_delta_its_manifest_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let hex = "ff".repeat(32);
        let key = Key::read(&key_file(dir.path(), &hex, 0o400)).unwrap();
        let other = Key([1; 32]);
        let delta = dir.path().join("delta-1-2.apd");
        let manifest = manifest_path(&delta);
        std::fs::write(&delta, b"delta bytes").unwrap();
        std::fs::write(&manifest, b"{}").unwrap();
        assert!(matches!(key.check(&delta), Err(MacError::Missing { .. })));
        let text = key.mac_file_text(&delta, Some(&manifest)).unwrap();
        std::fs::write(mac_path(&delta), &text).unwrap();
        key.check(&delta).unwrap();
        assert!(matches!(
            other.check(&delta),
            Err(MacError::Mismatch { .. })
        ));
        std::fs::write(&manifest, b"{\"x\":1}").unwrap();
        assert!(matches!(key.check(&delta), Err(MacError::Mismatch { .. })));
        std::fs::write(&manifest, b"{}").unwrap();
        std::fs::write(&delta, b"delta bytez").unwrap();
        assert!(matches!(key.check(&delta), Err(MacError::Mismatch { .. })));
    }
}
