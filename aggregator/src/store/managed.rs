//! The managed ClickHouse server: with no URL configured, the aggregator
//! runs `clickhouse-server` itself with its data under the aggregator's data
//! directory, on 127.0.0.1 and free ports, and stops it on exit.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Managed {
    child: Child,
    pub dir: PathBuf,
    pub http_port: u16,
    pub tcp_port: u16,
    /// Set when the server is being stopped: its merge threads are no longer kept at a
    /// lower priority. Held while they are reniced, so the two never cross.
    stopping: Arc<Mutex<bool>>,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Managed {
    /// Starts the server on free loopback ports. A port is free when chosen but may be
    /// taken (by any process's outgoing connection) before the server binds it: then the
    /// server exits with "Address already in use", and new ports are tried, up to 3 times.
    pub async fn start(data_dir: &Path, binary: &str, config_file: &Path) -> Result<Managed> {
        let mut attempt = 1;
        loop {
            match Self::start_once(data_dir, binary, config_file).await {
                Err(e) if attempt < 3 && format!("{e:#}").contains("Address already in use") => {
                    tracing::warn!(error = %format!("{e:#}"), attempt, "managed ClickHouse lost a port to another process; trying new ports");
                    attempt += 1;
                }
                r => return r,
            }
        }
    }

    async fn start_once(data_dir: &Path, binary: &str, config_file: &Path) -> Result<Managed> {
        let dir = data_dir.join("clickhouse");
        for sub in ["tmp", "user_files", "format_schemas", "log"] {
            std::fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("cannot create {}", dir.join(sub).display()))?;
        }
        if !config_file.exists() {
            bail!(
                "managed ClickHouse: {} does not exist. Install ClickHouse (Debian: apt-get install clickhouse-server; \
                 or run `cargo xtask up`, which installs it), or set [clickhouse] url to use an existing server",
                config_file.display()
            );
        }
        if let Some(dev) = ext4_without_journal(&dir) {
            tracing::warn!(data = %dir.display(), device = %dev, "the managed ClickHouse's data is on an ext4 filesystem without a journal: ext4 then avoids reusing recently deleted inodes, checking them one by one, which can take much of the CPU at high insert rates (docs/BENCHMARKS.md, section 3); an ext4 with a journal (mkfs.ext4's default) does not");
        }
        let (http_port, tcp_port, inter_port) = (free_port()?, free_port()?, free_port()?);
        let d = dir.display();
        let mut cmd = Command::new(binary);
        cmd.arg(format!("--config-file={}", config_file.display()))
            .arg("--")
            .arg(format!("--path={d}/"))
            .arg(format!("--tmp_path={d}/tmp/"))
            .arg(format!("--user_files_path={d}/user_files/"))
            .arg(format!("--format_schema_path={d}/format_schemas/"))
            .arg(format!("--logger.log={d}/log/clickhouse-server.log"))
            .arg(format!(
                "--logger.errorlog={d}/log/clickhouse-server.err.log"
            ))
            .arg(format!("--http_port={http_port}"))
            .arg(format!("--tcp_port={tcp_port}"))
            .arg(format!("--interserver_http_port={inter_port}"))
            .arg("--listen_host=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(
                dir.join("log/stderr.log"),
            )?));
        // Die with the aggregator even on SIGKILL.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| {
            format!("cannot run {binary:?}: is ClickHouse installed? (Debian: apt-get install clickhouse-server, or `cargo xtask up`)")
        })?;
        let mut m = Managed {
            child,
            dir: dir.clone(),
            http_port,
            tcp_port,
            stopping: Arc::default(),
        };
        tracing::info!(dir = %d, http_port, tcp_port, "starting managed ClickHouse");
        let url = m.url();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = m.child.try_wait()? {
                let log = std::fs::read_to_string(dir.join("log/clickhouse-server.err.log"))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                bail!(
                    "managed ClickHouse exited during start ({status}); last errors:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            if ping(&url).await {
                break;
            }
            if Instant::now() > deadline {
                bail!("managed ClickHouse did not answer on {url} within 60 s; see {d}/log/");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        std::fs::write(
            dir.join("ports"),
            format!("http_port={http_port}\ntcp_port={tcp_port}\n"),
        )?;
        tracing::info!(%url, "managed ClickHouse is up");
        Ok(m)
    }

    /// Keeps the server's background merge threads at `nice` (see
    /// `clickhouse.managed_merge_nice`): now, and every few seconds, since the pool is made
    /// when the first MergeTree table is and a restarted pool would come back at 0.
    pub fn lower_merge_priority(&self, nice: u8) {
        if nice == 0 {
            return;
        }
        let pid = self.child.id();
        let stopping = self.stopping.clone();
        tokio::spawn(async move {
            let mut logged = false;
            loop {
                let r = {
                    let done = stopping.lock().unwrap();
                    if *done {
                        return;
                    }
                    renice_merge_threads(pid, nice as i32)
                };
                match r {
                    Ok(n) if n > 0 && !logged => {
                        tracing::info!(
                            threads = n,
                            nice,
                            "managed ClickHouse: merge threads run at lower priority than inserts"
                        );
                        logged = true;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "managed ClickHouse: cannot lower the merge threads' priority; merges compete with inserts");
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        });
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    pub fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let pid = self.child.id();
            // A merge running when the server is told to stop must notice and end before
            // the server can exit; at a lower priority on a busy machine that took seconds
            // (measured: 2.8-4.5 s against 0.4 s, one merge under `stress-ng --cpu 8`),
            // so the merge threads get the server's own priority back first.
            *self.stopping.lock().unwrap() = true;
            if let Some(nice) = nice_of(pid, pid) {
                if let Err(e) = renice_merge_threads(pid, nice) {
                    tracing::debug!(error = %e, "managed ClickHouse: cannot restore the merge threads' priority before stopping it");
                }
            }
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    tracing::info!("managed ClickHouse stopped");
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            tracing::warn!(threads = %busy_threads(self.child.id()), "managed ClickHouse did not stop within 15 s of SIGTERM; killed");
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Thread `tid` of process `pid`: its name, and its `/proc` stat fields from the state on
/// (field 3 first).
fn task_stat(pid: u32, tid: &str) -> Option<(String, Vec<String>)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    // "tid (name) S ...": the name may hold spaces and parentheses.
    let (a, b) = (stat.find('(')?, stat.rfind(')')?);
    let rest = stat.get(b + 1..)?.split_whitespace().map(str::to_string);
    Some((stat[a + 1..b].to_string(), rest.collect()))
}

/// Thread `tid`'s nice value (field 19).
fn nice_of(pid: u32, tid: u32) -> Option<i32> {
    task_stat(pid, &tid.to_string())?.1.get(16)?.parse().ok()
}

/// Process `pid`'s threads by name and state (`R` running, `S` sleeping, `D` in the
/// kernel), counted: `BackgrProcPool R×2, HTTPHandler S×1, ...`, most first.
fn busy_threads(pid: u32) -> String {
    let mut seen: std::collections::BTreeMap<String, usize> = Default::default();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let tid = t.file_name();
            if let Some((name, f)) = task_stat(pid, &tid.to_string_lossy()) {
                let state = f.first().map_or("?", String::as_str);
                // The system call a sleeping thread waits in (x86-64 numbers; readable by
                // the server's owner or root).
                let call = std::fs::read_to_string(t.path().join("syscall")).unwrap_or_default();
                let at = match call.split_whitespace().next() {
                    Some(n) if n.parse::<u32>().is_ok() => format!(" in {}", syscall_name(n)),
                    _ => String::new(),
                };
                *seen.entry(format!("{name} {state}{at}")).or_default() += 1;
            }
        }
    }
    let mut v: Vec<(String, usize)> = seen.into_iter().collect();
    v.sort_by(|x, y| y.1.cmp(&x.1).then_with(|| x.0.cmp(&y.0)));
    let v: Vec<String> = v.into_iter().map(|(k, n)| format!("{k}×{n}")).collect();
    v.join(", ")
}

/// A few x86-64 system calls a server thread waits in, by number.
fn syscall_name(n: &str) -> String {
    let name = match (std::env::consts::ARCH, n) {
        ("x86_64", "0") => "read",
        ("x86_64", "7") => "poll",
        ("x86_64", "23") => "select",
        ("x86_64", "35") => "nanosleep",
        ("x86_64", "45") => "recvfrom",
        ("x86_64", "61") => "wait4",
        ("x86_64", "202") => "futex",
        ("x86_64", "230") => "clock_nanosleep",
        ("x86_64", "232") => "epoll_wait",
        ("x86_64", "271") => "ppoll",
        ("x86_64", "281") => "epoll_pwait",
        _ => return format!("syscall {n}"),
    };
    name.to_string()
}

/// Thread names of ClickHouse's background merge pools: `BackgrProcPool` up to 20.x
/// (18.16 here), `MergeMutate` in later servers.
const MERGE_THREADS: &[&str] = &["BackgrProcPool", "MergeMutate"];

/// Sets the nice value of each of process `pid`'s merge threads to `nice`; returns how many
/// threads it found. A thread that exits meanwhile is skipped.
pub fn renice_merge_threads(pid: u32, nice: i32) -> std::io::Result<usize> {
    let mut n = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let t = t?;
        let Ok(comm) = std::fs::read_to_string(t.path().join("comm")) else {
            continue;
        };
        if !MERGE_THREADS.iter().any(|m| comm.trim_end().starts_with(m)) {
            continue;
        }
        let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        // On Linux, PRIO_PROCESS with a thread id sets that thread alone.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ESRCH) {
                continue;
            }
            return Err(e);
        }
        n += 1;
    }
    Ok(n)
}

/// True when `GET /ping` answers "Ok.".
pub async fn ping(url: &str) -> bool {
    let Some(hostport) = url.strip_prefix("http://") else {
        return false;
    };
    let hostport = hostport.trim_end_matches('/');
    let Ok(Ok(mut s)) = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(hostport),
    )
    .await
    else {
        return false;
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let req = format!("GET /ping HTTP/1.0\r\nHost: {hostport}\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).contains("Ok.")
}

/// The device (its name under /sys/block) when `path` is on an ext4 filesystem without a
/// journal; None otherwise, or when it cannot tell. Without a journal ext4 avoids reusing an
/// inode for up to 5 minutes after it was deleted, checking each free inode it tries, and a
/// ClickHouse that creates and deletes part files quickly spends much of its CPU there (45 %
/// of this test VM's in a `perf` profile at 3 M samples/s; docs/BENCHMARKS.md, section 3).
pub fn ext4_without_journal(path: &Path) -> Option<String> {
    let path = std::fs::canonicalize(path).ok()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let (dev, fstype) = mount_of(&info, &path)?;
    if fstype != "ext4" {
        return None;
    }
    let link = std::fs::read_link(format!("/sys/dev/block/{dev}")).ok()?;
    let name = link.file_name()?.to_str()?.to_string();
    // Only when the name is the one ext4 lists its mounts under.
    if !Path::new("/proc/fs/ext4").join(&name).exists() {
        return None;
    }
    let journaled = std::fs::read_dir("/proc/fs/jbd2")
        .map(|d| {
            d.flatten().any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{name}-"))
            })
        })
        .unwrap_or(false);
    (!journaled).then_some(name)
}

/// The `major:minor` and filesystem type of the mount `path` is on, from mountinfo text
/// (parsed as the sensor's filesystem collector does; the mount whose mount point is the
/// longest prefix of `path`, the last such winning, as a later mount over the same point
/// hides the earlier).
fn mount_of(mountinfo: &str, path: &Path) -> Option<(String, String)> {
    use procfs::FromRead;
    let mounts = procfs::process::MountInfos::from_read(mountinfo.as_bytes()).ok()?;
    mounts
        .0
        .into_iter()
        .filter_map(|m| {
            // Mount points escape a space as octal (\040).
            let point = PathBuf::from(m.mount_point.to_string_lossy().replace("\\040", " "));
            path.starts_with(&point)
                .then(|| (point.components().count(), m.majmin, m.fs_type))
        })
        .max_by_key(|(len, _, _)| *len)
        .map(|(_, d, t)| (d, t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mount_of_a_path_is_the_longest_matching_point() {
        let info = "22 27 0:21 / /proc rw,relatime - proc proc rw\n\
                    27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
                    40 27 7:0 / /mnt/data rw,relatime - ext4 /dev/loop0 rw\n\
                    41 27 0:50 / /mnt/data/tmp rw - tmpfs tmpfs rw\n\
                    42 27 0:51 / /mnt/my\\040disk rw - xfs /dev/sdb rw\n";
        let m = |p: &str| mount_of(info, Path::new(p)).map(|(d, t)| format!("{d} {t}"));
        assert_eq!(m("/var/lib/x").as_deref(), Some("254:0 ext4"));
        assert_eq!(m("/mnt/data/ch").as_deref(), Some("7:0 ext4"));
        assert_eq!(m("/mnt/data/tmp/a").as_deref(), Some("0:50 tmpfs"));
        assert_eq!(m("/mnt/database").as_deref(), Some("254:0 ext4"));
        assert_eq!(m("/mnt/my disk/x").as_deref(), Some("0:51 xfs"));
    }

    /// On real ext4 filesystems (loop devices; root only): one made without a journal is
    /// told, one with a journal (`mkfs.ext4`'s default) and a tmpfs are not.
    #[test]
    fn an_ext4_without_a_journal_is_told_apart() {
        if unsafe { libc::geteuid() } != 0 || Command::new("mkfs.ext4").arg("-V").output().is_err()
        {
            eprintln!("SKIP: needs root and mkfs.ext4");
            return;
        }
        let base = std::env::temp_dir().join(format!("sonde-ext4-{}", std::process::id()));
        struct Unmount(Vec<PathBuf>, PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                for m in &self.0 {
                    let _ = Command::new("umount").arg(m).status();
                }
                let _ = std::fs::remove_dir_all(&self.1);
            }
        }
        let mut guard = Unmount(Vec::new(), base.clone());
        let sh = |c: &str| {
            let ok = Command::new("sh")
                .args(["-c", c])
                .status()
                .unwrap()
                .success();
            assert!(ok, "{c}");
        };
        for (name, opts) in [("journal", ""), ("nojournal", "-O ^has_journal")] {
            let (img, mnt) = (base.join(format!("{name}.img")), base.join(name));
            std::fs::create_dir_all(&mnt).unwrap();
            sh(&format!(
                "truncate -s 64M {0} && mkfs.ext4 -q -F {opts} {0}",
                img.display()
            ));
            sh(&format!(
                "mount -o loop {} {}",
                img.display(),
                mnt.display()
            ));
            guard.0.push(mnt);
        }
        let tmpfs = base.join("tmpfs");
        std::fs::create_dir_all(&tmpfs).unwrap();
        sh(&format!("mount -t tmpfs tmpfs {}", tmpfs.display()));
        guard.0.push(tmpfs.clone());
        assert_eq!(ext4_without_journal(&base.join("journal")), None);
        let told = ext4_without_journal(&base.join("nojournal"));
        assert!(
            told.as_deref().is_some_and(|d| d.starts_with("loop")),
            "{told:?}"
        );
        assert_eq!(ext4_without_journal(&tmpfs), None);
        drop(guard);
    }

    #[test]
    fn renices_merge_threads_only() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let merge = std::thread::Builder::new()
            .name("BackgrProcPool".into())
            .spawn(move || {
                tx.send(unsafe { libc::gettid() } as u32).unwrap();
                let _ = stop_rx.recv();
            })
            .unwrap();
        let merge_tid = rx.recv().unwrap();
        let me = unsafe { libc::gettid() } as u32;
        let pid = std::process::id();
        let before = nice_of(pid, me).unwrap();
        assert_eq!(before, unsafe { libc::getpriority(libc::PRIO_PROCESS, me) });
        let n = renice_merge_threads(pid, 7).unwrap();
        assert_eq!(n, 1, "one thread named like a merge thread");
        assert_eq!(nice_of(pid, merge_tid), Some(7));
        assert_eq!(
            nice_of(pid, me),
            Some(before),
            "other threads keep their priority"
        );
        // Listed by name and state (running or asleep, whichever it is now), counted.
        let threads = busy_threads(pid);
        let listed = threads
            .split(", ")
            .find(|t| t.starts_with("BackgrProcPool "));
        assert!(
            listed.is_some_and(|t| t.ends_with("×1") && (t.contains(" S") || t.contains(" R"))),
            "{threads}"
        );
        // Back to the process's own priority (as before a stop; a user without the right
        // to raise a priority cannot).
        match renice_merge_threads(pid, before) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM)) => {}
            r => {
                r.unwrap();
                assert_eq!(nice_of(pid, merge_tid), Some(before));
            }
        }
        stop_tx.send(()).unwrap();
        merge.join().unwrap();
        assert!(
            renice_merge_threads(u32::MAX, 7).is_err(),
            "no such process"
        );
    }
}
