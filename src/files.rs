//! Reading the operator's files: the config, page templates, certificates and keys. Only
//! regular files of a bounded size are read. A FIFO or a device named by mistake would
//! otherwise block a start or a reload for as long as nothing writes to it, or fill memory
//! (`/dev/zero`); such a file is refused at once, saying what it is.

use std::io::{self, Read};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

/// The config file at most: far more than any config needs.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// A page template at most (held in memory for every language, rendered at each change).
pub const MAX_TEMPLATE_BYTES: u64 = 1 << 20;
/// A PEM file at most (a certificate chain, a key, a CA bundle: the system's is ~200 KiB).
pub const MAX_PEM_BYTES: u64 = 4 << 20;

/// The bytes of the regular file `path`, refused when it is no regular file or holds more
/// than `limit` bytes.
pub fn read(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    // Opening a FIFO for reading waits for a writer unless told not to; on a regular file the
    // flag changes nothing.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| dangling(path).unwrap_or(e))?;
    let meta = file.metadata()?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let what = if kind.is_dir() {
            "a folder"
        } else if kind.is_fifo() {
            "a FIFO (named pipe)"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(refused(format!("it is {what}, not a regular file")));
    }
    let too_large = || refused(format!("it is larger than {} KiB", limit >> 10));
    if meta.len() > limit {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    // The file may grow while it is read.
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(too_large());
    }
    Ok(bytes)
}

/// `read`, as UTF-8 text.
pub fn read_text(path: &Path, limit: u64) -> io::Result<String> {
    text(read(path, limit)?)
}

/// Bytes read, as UTF-8 text.
pub fn text(bytes: Vec<u8>) -> io::Result<String> {
    String::from_utf8(bytes).map_err(|e| {
        let why = not_utf8(e.as_bytes(), e.utf8_error());
        io::Error::new(io::ErrorKind::InvalidData, why)
    })
}

/// How a reload waits out a file that is being written in place (an editor's save, `cat >`,
/// a deploy's copy): one caught half-written that is still valid TOML (cut after its
/// `[proxy]` section) was put in force, every later section back to its defaults.
#[derive(Debug, Clone, Copy)]
pub struct Settle {
    /// A file is taken as written once it has not changed for this long: by its stamp (its
    /// modification time, size and inode), or by what reads this far apart found. A writer
    /// pausing longer than this between two pieces is not seen.
    pub recent: Duration,
    /// The wait between two reads.
    pub pause: Duration,
    /// How long the reads may go on; the last one is then taken, and said to be.
    pub give_up: Duration,
}

/// A reload's: a file saved more than a second ago is read once, as before; one just
/// written waits until it is a second old. Two reads 200 ms apart that agreed were taken
/// as the file whole, and a writer that paused longer than that (a copy from a slow mount,
/// a script between two `>>`; 500 ms in h197's test) had its first part put in force: the
/// site in outage on the default server, its HTTPS listener closed.
pub const SETTLE: Settle = Settle {
    recent: Duration::from_secs(1),
    pause: Duration::from_millis(200),
    give_up: Duration::from_secs(3),
};

/// What `read_settled` read.
#[derive(Debug)]
pub struct Settled {
    pub bytes: Vec<u8>,
    /// It was still changing when the reads gave up: the bytes are the last read.
    pub still_changing: bool,
}

/// `read`, again and again until the file has been left alone for `settle.recent` (or
/// `give_up` has passed): its stamp is that old and the same before and after the read,
/// or reads that far apart found the same bytes (a file rewritten the same, or stamped by
/// a filesystem that keeps whole seconds). It sleeps: call it on a thread that may block (a
/// reload reads on tokio's blocking pool, never on a runtime's worker).
pub fn read_settled(path: &Path, limit: u64, settle: &Settle) -> io::Result<Settled> {
    let began = Instant::now();
    // The bytes read, and when they were first read so.
    let mut same_since: Option<(Vec<u8>, Instant)> = None;
    loop {
        let before = Stamp::of(path);
        let read = read(path, limit);
        let after = Stamp::of(path);
        // A file that is not there, or not one to read (a FIFO, too large), is refused at
        // once; one that moved under the read (an editor renaming it away for a moment)
        // is read again.
        if read.is_err() && before == after {
            return read.map(|bytes| Settled {
                bytes,
                still_changing: false,
            });
        }
        let now = Instant::now();
        let left_alone = before.is_some()
            && before == after
            && after.is_some_and(|s| !s.changed_within(settle.recent));
        let unchanged_for = match (&read, &mut same_since) {
            (Ok(bytes), Some((same, since))) if same == bytes => now.duration_since(*since),
            (Ok(bytes), same) => {
                *same = Some((bytes.clone(), now));
                Duration::ZERO
            }
            (Err(_), same) => {
                *same = None;
                Duration::ZERO
            }
        };
        let settled = left_alone || unchanged_for >= settle.recent;
        if settled || now.duration_since(began) + settle.pause > settle.give_up {
            return read.map(|bytes| Settled {
                bytes,
                still_changing: !settled,
            });
        }
        std::thread::sleep(settle.pause);
    }
}

/// What a write in place changes: the modification time and the size; the inode, for a
/// file replaced by a rename.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: SystemTime,
    len: u64,
    inode: u64,
}

impl Stamp {
    fn of(path: &Path) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).ok()?;
        Some(Stamp {
            modified: meta.modified().ok()?,
            len: meta.len(),
            inode: meta.ino(),
        })
    }

    /// Whether it was modified less than `recent` ago, or is stamped less than `recent`
    /// ahead of the clock (written from a host whose clock runs a little ahead).
    fn changed_within(&self, recent: Duration) -> bool {
        let apart = match SystemTime::now().duration_since(self.modified) {
            Ok(age) => age,
            Err(ahead) => ahead.duration(),
        };
        apart < recent
    }
}

/// Where text stops being UTF-8, and the likely why: one `é` or `–` saved by an editor set
/// to Latin-1 or Windows-1252 (or a whole file saved as UTF-16) in a config of hundreds of
/// lines, with only "not UTF-8" said, left the operator to search it byte by byte. Only the
/// byte is shown, never the line, which may hold a secret.
fn not_utf8(bytes: &[u8], e: std::str::Utf8Error) -> String {
    if bytes.starts_with(&[0xff, 0xfe]) || bytes.starts_with(&[0xfe, 0xff]) {
        return "it is not UTF-8 text: it is UTF-16 (it begins with a UTF-16 byte order mark); \
                save it as UTF-8"
            .to_owned();
    }
    let at = e.valid_up_to();
    let before = String::from_utf8_lossy(&bytes[..at]);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    let byte = bytes.get(at).copied().unwrap_or_default();
    format!(
        "it is not UTF-8 text: line {line}, column {column} has the byte 0x{byte:02X} (a \
         character saved as Latin-1 or Windows-1252?); save the file as UTF-8"
    )
}

/// A symbolic link at `path` to nothing (a release folder removed under a `current` link, a
/// Kubernetes `..data` swapped away): "No such file or directory" of a name `ls` shows
/// left the operator looking at a file that is there.
fn dangling(path: &Path) -> Option<io::Error> {
    let target = std::fs::read_link(path).ok()?;
    // Only a link to what does not exist is one to nothing: a loop of links (`ELOOP`), or a
    // target this user may not look at, is said as it is, where `exists()` (false on any
    // error) made a state file that is a loop read as no file, and maintenance off.
    match std::fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        _ => return None,
    }
    Some(io::Error::new(
        io::ErrorKind::NotFound,
        format!(
            "it is a symbolic link to {}, which does not exist",
            target.display()
        ),
    ))
}

fn refused(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, why)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_to_nothing_is_said_to_be_one() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("config.toml");
        std::os::unix::fs::symlink("..data/config.toml", &link).unwrap();
        let e = read(&link, 1024).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert_eq!(
            e.to_string(),
            "it is a symbolic link to ..data/config.toml, which does not exist"
        );
        // A missing file that is no link is said as the system says it.
        let e = read(&dir.path().join("none.toml"), 1024).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(!e.to_string().contains("symbolic link"), "{e}");
    }

    /// A loop of links is no link to nothing: taken for one, a state file that is a loop was
    /// read as no file at all, and the proxy started with maintenance off.
    #[test]
    fn a_loop_of_links_is_said_as_one() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("state.json");
        std::os::unix::fs::symlink("state.json", &link).unwrap();
        let e = read(&link, 1024).unwrap_err();
        assert_ne!(e.kind(), io::ErrorKind::NotFound, "{e}");
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{e}");
    }

    #[test]
    fn a_regular_file_is_read_whole_up_to_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.txt");
        std::fs::write(&path, "12345678").unwrap();
        assert_eq!(read_text(&path, 8).unwrap(), "12345678");
        let err = read(&path, 7).unwrap_err();
        assert!(err.to_string().contains("larger than"), "{err}");
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        let err = read_text(&path, 8).unwrap_err().to_string();
        assert!(err.contains("UTF-16"), "{err}");
    }

    /// A character saved in another encoding is named by its line and column, so that it
    /// can be found in a long file; the line's text is not repeated (it may hold a secret).
    #[test]
    fn text_that_is_not_utf8_says_where() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, b"[maintenance]\nmessage = \"Caf\xe9 closed\"\n").unwrap();
        let err = read_text(&path, 1 << 20).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let err = err.to_string();
        assert!(err.contains("line 2, column 15"), "{err}");
        assert!(err.contains("0xE9"), "{err}");
        assert!(!err.contains("closed"), "the line is not shown: {err}");
    }

    /// Appends `pieces` to the file at `path` in a thread, each after `pause`: a writer seen
    /// by the reads.
    fn appending(
        path: &Path,
        pieces: &'static [&'static str],
        pause: Duration,
    ) -> std::thread::JoinHandle<()> {
        let path = path.to_path_buf();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut file = std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .unwrap();
            for piece in pieces {
                std::thread::sleep(pause);
                file.write_all(piece.as_bytes()).unwrap();
            }
        })
    }

    /// A file written in place while it is read, in pieces less than a pause apart, is read
    /// whole; a file written long ago is read once, at once.
    #[test]
    fn a_file_being_written_is_read_once_it_stops_changing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "[proxy]\n").unwrap();
        let writer = appending(
            &path,
            &["[upstream]\n", "servers = []\n", "[log]\n"],
            Duration::from_millis(50),
        );
        let read = read_settled(&path, 1 << 20, &SETTLE).unwrap();
        writer.join().unwrap();
        assert!(!read.still_changing);
        assert_eq!(read.bytes, b"[proxy]\n[upstream]\nservers = []\n[log]\n");

        // Written long ago: one read, no wait.
        let old = SystemTime::now() - Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let began = Instant::now();
        assert!(
            !read_settled(&path, 1 << 20, &SETTLE)
                .unwrap()
                .still_changing
        );
        assert!(began.elapsed() < SETTLE.pause, "{:?}", began.elapsed());
    }

    /// A writer that pauses longer than the reads' pause between two pieces (a copy from a
    /// slow mount, a script between two `>>`) is waited for: two reads 200 ms apart agreed on
    /// the first piece alone, and a reload put it in force, the rest of the file at its
    /// defaults.
    #[test]
    fn a_writer_pausing_between_two_pieces_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "[proxy]\n").unwrap();
        let writer = appending(&path, &["[upstream]\nservers = []\n"], SETTLE.pause * 5 / 2);
        let read = read_settled(&path, 1 << 20, &SETTLE).unwrap();
        writer.join().unwrap();
        assert!(!read.still_changing);
        assert_eq!(read.bytes, b"[proxy]\n[upstream]\nservers = []\n");
    }

    /// A file that never stops changing is taken as last read once the reads give up, and
    /// said to be still changing.
    #[test]
    fn a_file_that_keeps_changing_is_taken_as_last_read_and_said_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "0").unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (path, stop) = (path.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n += 1;
                    std::fs::write(&path, n.to_string()).unwrap();
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        let settle = Settle {
            recent: Duration::from_secs(1),
            pause: Duration::from_millis(100),
            give_up: Duration::from_millis(500),
        };
        let began = Instant::now();
        let read = read_settled(&path, 1 << 20, &settle);
        let took = began.elapsed();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().unwrap();
        assert!(read.unwrap().still_changing);
        assert!(took < Duration::from_secs(2), "{took:?}");
    }

    /// A FIFO is refused at once, where reading it would wait for a writer for ever.
    #[test]
    fn a_fifo_a_device_and_a_folder_are_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.unwrap().success(), "mkfifo failed");
        for (path, what) in [
            (fifo.as_path(), "FIFO"),
            (Path::new("/dev/zero"), "device"),
            (dir.path(), "folder"),
        ] {
            let err = read(path, 1 << 20).unwrap_err();
            assert!(err.to_string().contains(what), "{}: {err}", path.display());
        }
    }
}
