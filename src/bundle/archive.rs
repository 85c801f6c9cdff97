//! The bundle's container: a tar archive compressed with zstd, optionally encrypted
//! with age. Owns writing it reproducibly and opening it again; what the entries hold is
//! the export's and verify's business.
//!
//! Reproducible means: entries in a fixed order (the manifest first, then the others by
//! path), ustar headers with mode 0644, uid and gid 0, no user or group names and the
//! bundle's creation time as mtime, and single-threaded zstd at a fixed level. Age
//! encryption uses a fresh random file key each time, so only unencrypted bundles are
//! byte-identical; the archive inside an encrypted one still is.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::Path;

use anyhow::{bail, Context};

/// zstd's default level: about as fast as the redaction that feeds it.
const ZSTD_LEVEL: i32 = 3;

/// The first bytes of each container we can meet.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
const AGE_MAGIC: &[u8] = b"age-encryption.org/v1\n";
const AGE_ARMOR: &[u8] = b"-----BEGIN AGE ENCRYPTED FILE-----";

/// Where the compressed stream goes: the file, or age's encryptor in front of it.
enum Sink<W: Write> {
    Plain(W),
    Encrypted(age::stream::StreamWriter<W>),
}

impl<W: Write> Write for Sink<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sink::Plain(w) => w.write(buf),
            Sink::Encrypted(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Plain(w) => w.flush(),
            Sink::Encrypted(w) => w.flush(),
        }
    }
}

/// Writes entries into a new bundle.
pub struct ArchiveWriter<W: Write> {
    tar: tar::Builder<zstd::Encoder<'static, Sink<W>>>,
    mtime: u64,
}

impl<W: Write> ArchiveWriter<W> {
    /// `recipients` non-empty means the whole archive is encrypted to them.
    pub fn new(
        out: W,
        mtime: u64,
        recipients: &[age::x25519::Recipient],
    ) -> anyhow::Result<ArchiveWriter<W>> {
        let sink = if recipients.is_empty() {
            Sink::Plain(out)
        } else {
            let encryptor = age::Encryptor::with_recipients(
                recipients.iter().map(|r| r as &dyn age::Recipient),
            )
            .context("cannot encrypt to the --encrypt-to recipients")?;
            Sink::Encrypted(encryptor.wrap_output(out).context("cannot write the age header")?)
        };
        let mut zstd = zstd::Encoder::new(sink, ZSTD_LEVEL).context("cannot start zstd")?;
        zstd.include_checksum(true).context("cannot configure zstd")?;
        let mut tar = tar::Builder::new(zstd);
        tar.mode(tar::HeaderMode::Deterministic);
        Ok(ArchiveWriter { tar, mtime })
    }

    /// Appends a regular file of `size` bytes read from `data`.
    pub fn append(&mut self, path: &str, size: u64, data: impl Read) -> io::Result<()> {
        let mut header = tar::Header::new_ustar();
        header.set_path(path)?;
        header.set_size(size);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(self.mtime);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        self.tar.append(&header, data)
    }

    /// Ends the tar, the zstd frame and the age stream, and returns the output.
    pub fn finish(self) -> io::Result<W> {
        let zstd = self.tar.into_inner()?;
        match zstd.finish()? {
            Sink::Plain(w) => Ok(w),
            Sink::Encrypted(w) => w.finish(),
        }
    }
}

/// True if and only if the file starts like an age file.
pub fn is_encrypted(path: &Path) -> anyhow::Result<bool> {
    let mut head = [0u8; 64];
    let n = read_head(path, &mut head)?;
    Ok(head[..n].starts_with(AGE_MAGIC))
}

fn read_head(path: &Path, head: &mut [u8]) -> anyhow::Result<usize> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut n = 0;
    while n < head.len() {
        match file.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }
    Ok(n)
}

/// Opens a bundle for reading its tar stream: decrypted with `identity` if it is an age
/// file, then decompressed.
pub fn open(path: &Path, identity: Option<&Path>) -> anyhow::Result<tar::Archive<Box<dyn Read>>> {
    let mut head = [0u8; 64];
    let n = read_head(path, &mut head)?;
    let head = &head[..n];
    let file = BufReader::with_capacity(
        256 * 1024,
        File::open(path).with_context(|| format!("cannot open {}", path.display()))?,
    );
    let compressed: Box<dyn BufRead> = if head.starts_with(AGE_MAGIC) {
        let Some(identity) = identity else {
            bail!(
                "{} is encrypted with age: pass --identity FILE (the recipient's age identity)",
                path.display()
            );
        };
        let identities = age::IdentityFile::from_file(identity.to_string_lossy().into_owned())
            .and_then(|f| f.into_identities().map_err(io::Error::other))
            .with_context(|| format!("cannot read the age identity file {}", identity.display()))?;
        let decryptor = age::Decryptor::new_buffered(file)
            .with_context(|| format!("{} is not a readable age file", path.display()))?;
        let reader = decryptor
            .decrypt(identities.iter().map(|i| i.as_ref() as &dyn age::Identity))
            .with_context(|| {
                format!(
                    "cannot decrypt {} with {} (was the bundle encrypted to this identity?)",
                    path.display(),
                    identity.display()
                )
            })?;
        Box::new(BufReader::with_capacity(256 * 1024, reader))
    } else if head.starts_with(AGE_ARMOR) {
        bail!(
            "{} is an armored age file, which qlog does not write: decrypt it with age -d first",
            path.display()
        );
    } else if head.starts_with(&ZSTD_MAGIC) {
        Box::new(file)
    } else {
        bail!("{} is not a qlog bundle (neither zstd nor age data)", path.display());
    };
    let tar_stream = zstd::Decoder::with_buffer(compressed)
        .with_context(|| format!("cannot decompress {}", path.display()))?;
    Ok(tar::Archive::new(Box::new(tar_stream) as Box<dyn Read>))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(mtime: u64) -> Vec<u8> {
        let mut w = ArchiveWriter::new(Vec::new(), mtime, &[]).unwrap();
        w.append("manifest.json", 2, &b"{}"[..]).unwrap();
        w.append("events/vm-0123456789.jsonl", 3, &b"{}\n"[..]).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn the_same_entries_give_the_same_bytes() {
        assert_eq!(bundle(1_796_256_000), bundle(1_796_256_000));
        assert_ne!(bundle(1_796_256_000), bundle(1_796_256_001));
    }

    #[test]
    fn headers_carry_no_owner_or_local_time() {
        let bytes = zstd::decode_all(&bundle(42)[..]).unwrap();
        let mut archive = tar::Archive::new(&bytes[..]);
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            let h = entry.header();
            assert_eq!((h.uid().unwrap(), h.gid().unwrap()), (0, 0));
            assert_eq!((h.mode().unwrap(), h.mtime().unwrap()), (0o644, 42));
            assert_eq!(h.username().unwrap(), Some(""));
        }
    }

    #[test]
    fn encrypted_bundles_open_with_the_identity_only() {
        let dir = tempfile::tempdir().unwrap();
        let identity = age::x25519::Identity::generate();
        let id_path = dir.path().join("key.txt");
        use age::secrecy::ExposeSecret;
        std::fs::write(&id_path, format!("{}\n", identity.to_string().expose_secret())).unwrap();
        let path = dir.path().join("b.tar.zst.age");
        let mut w =
            ArchiveWriter::new(File::create(&path).unwrap(), 0, &[identity.to_public()]).unwrap();
        w.append("manifest.json", 2, &b"{}"[..]).unwrap();
        w.finish().unwrap();

        assert!(is_encrypted(&path).unwrap());
        let err = open(&path, None).err().unwrap().to_string();
        assert!(err.contains("--identity"), "{err}");
        let mut archive = open(&path, Some(&id_path)).unwrap();
        let mut entries = archive.entries().unwrap();
        let mut first = entries.next().unwrap().unwrap();
        let mut content = String::new();
        first.read_to_string(&mut content).unwrap();
        assert_eq!(content, "{}");
    }
}
