//! Opening input files safely: only regular files (or symlinks to them) are opened, and side files are
//! read with a size limit. A FIFO, a socket, a character device such as `/dev/zero` or a folder given
//! where a file is expected is refused at once instead of blocking forever or filling memory.

use std::fs::File;
use std::io::Read;
use std::path::Path;

/// Largest JSON or text side file read whole (config.json, tokenizer.json, an index, a manifest, a
/// recipe, a `--text` input).
pub const SIDE_FILE_LIMIT: u64 = 64 << 20;

/// What a path is, when it is not a regular file.
fn kind(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if t.is_dir() {
        "a folder"
    } else {
        "not a regular file"
    }
}

/// Opens `path` for reading if it is a regular file (symlinks are followed). The open itself cannot
/// block: on Unix it is non-blocking, and the type is checked on the opened file (no race between the
/// check and the open).
pub fn open_regular(path: &Path) -> std::io::Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("is {}, not a regular file", kind(&meta)),
        ));
    }
    #[cfg(unix)]
    {
        // Back to blocking reads (no effect on regular files, but nothing later is surprised).
        use std::os::fd::AsRawFd;
        // SAFETY: fcntl on a descriptor we own, with flags read from it just before.
        unsafe {
            let fd = file.as_raw_fd();
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
            }
        }
    }
    Ok(file)
}

/// Reads a whole regular file of at most `limit` bytes.
pub fn read_limited(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    let file = open_regular(path)?;
    let too_large = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {} MiB, the limit for this file", limit >> 20),
        )
    };
    let len = file.metadata()?.len();
    if len > limit {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(len as usize);
    // `take` guards against a file that grows while it is read.
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(too_large());
    }
    Ok(bytes)
}

/// Reads a whole regular UTF-8 text file of at most `limit` bytes.
pub fn read_text_limited(path: &Path, limit: u64) -> std::io::Result<String> {
    String::from_utf8(read_limited(path, limit)?)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not valid UTF-8 text"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_files_are_read_and_others_refused_without_blocking() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("a.json");
        std::fs::write(&f, "{}").unwrap();
        assert_eq!(read_text_limited(&f, 10).unwrap(), "{}");
        let e = read_limited(&f, 1).unwrap_err().to_string();
        assert!(e.contains("larger than 0 MiB"), "{e}");
        let e = open_regular(d.path()).unwrap_err().to_string();
        assert!(e.contains("a folder"), "{e}");
        #[cfg(unix)]
        {
            let link = d.path().join("zero");
            std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
            let e = read_limited(&link, 1 << 20).unwrap_err().to_string();
            assert!(e.contains("character device"), "{e}");
            let fifo = d.path().join("fifo");
            let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
            // SAFETY: a valid NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
            let e = read_limited(&fifo, 1 << 20).unwrap_err().to_string();
            assert!(e.contains("FIFO"), "{e}");
            let good = d.path().join("good");
            std::os::unix::fs::symlink(&f, &good).unwrap();
            assert_eq!(read_limited(&good, 10).unwrap(), b"{}");
        }
    }
}
