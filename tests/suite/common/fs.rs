//! A small filesystem of its own for disk tests.

/// A filesystem of its own for `disk_cleanup`: a tmpfs when this process may mount one (so
/// the figures are exact), else a directory on the shared disk.
pub struct TestFs {
    /// Where it is mounted.
    pub dir: tempfile::TempDir,
    /// Whether it is a tmpfs of its own.
    pub mounted: bool,
}

impl TestFs {
    /// Mounts a 64 MiB tmpfs on a temp dir, or falls back to the plain dir.
    pub fn new() -> TestFs {
        Self::sized("64m")
    }

    /// A tmpfs of this size (`512k`, `64m`), or the plain dir.
    pub fn sized(size: &str) -> TestFs {
        let dir = tempfile::Builder::new().prefix("rx-fs").tempdir().unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        TestFs { dir, mounted }
    }

    /// Writes `count` files of `size` bytes under `junk/`; returns the bytes written.
    pub fn fill(&self, count: usize, size: usize) -> u64 {
        let junk = self.dir.path().join("junk");
        std::fs::create_dir_all(&junk).unwrap();
        for i in 0..count {
            std::fs::write(junk.join(format!("f{i}.log")), vec![7u8; size]).unwrap();
        }
        (count * size) as u64
    }
}

impl Drop for TestFs {
    fn drop(&mut self) {
        if self.mounted {
            let _ = std::process::Command::new("umount")
                .arg(self.dir.path())
                .status();
        }
    }
}
