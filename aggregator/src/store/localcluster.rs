//! A local ClickHouse cluster for trying scale-out and for its tests: one ZooKeeper and
//! `shards × replicas` clickhouse-server processes on loopback ports, each with its own
//! directory, the cluster `sonde` in `remote_servers` (internal replication) and the
//! macros `{shard}` and `{replica}`.
//!
//! Plain std (no async), so that `cargo xtask cluster up` can use this file too.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const CLUSTER: &str = "sonde";

pub type Res<T> = Result<T, String>;

fn free_port() -> Res<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free loopback port: {e}"))
}

pub struct Server {
    pub shard: usize,
    pub replica: usize,
    pub http_port: u16,
    pub tcp_port: u16,
    pub inter_port: u16,
    pub dir: PathBuf,
    child: Option<Child>,
}

impl Server {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }
    pub fn name(&self) -> String {
        format!("s{}r{}", self.shard, self.replica)
    }
}

pub struct LocalCluster {
    pub dir: PathBuf,
    pub zk_port: u16,
    zk: Option<Child>,
    pub servers: Vec<Server>,
    binary: String,
}

/// The ZooKeeper of Debian's `zookeeper` package: java and its jar.
fn zookeeper_classpath() -> Res<String> {
    let jar = "/usr/share/java/zookeeper.jar";
    if !Path::new(jar).exists() {
        return Err(format!(
            "ZooKeeper is not installed ({jar} missing): apt-get install zookeeper \
             (or `cargo xtask cluster up`, which installs it)"
        ));
    }
    // slf4j-simple (Debian's libslf4j-java, a dependency of the package) for its log.
    Ok(format!(
        "/etc/zookeeper/conf:{jar}:/usr/share/java/slf4j-simple.jar"
    ))
}

/// Sends a four-letter word to ZooKeeper; its answer.
pub fn zk_word(port: u16, word: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(1),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(word.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// `GET /ping` on a ClickHouse HTTP port.
pub fn ping(port: u16) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(1),
    ) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /ping HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.contains("Ok.")
}

/// Ends the child with the thread that started it (a killed test or `xtask` leaves no
/// servers behind).
fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    }
}

fn kill(child: &mut Option<Child>, sig: i32) {
    if let Some(c) = child.as_mut() {
        unsafe { libc::kill(c.id() as i32, sig) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
    *child = None;
}

impl LocalCluster {
    /// Starts ZooKeeper and `shards × replicas` servers under `dir` (created; reused when it
    /// already holds a cluster's data). `binary`: clickhouse-server.
    pub fn start(dir: &Path, shards: usize, replicas: usize, binary: &str) -> Res<LocalCluster> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut c = LocalCluster {
            dir: dir.to_path_buf(),
            zk_port: free_port()?,
            zk: None,
            servers: Vec::new(),
            binary: binary.to_string(),
        };
        for s in 1..=shards {
            for r in 1..=replicas {
                c.servers.push(Server {
                    shard: s,
                    replica: r,
                    http_port: free_port()?,
                    tcp_port: free_port()?,
                    inter_port: free_port()?,
                    dir: dir.join(format!("s{s}r{r}")),
                    child: None,
                });
            }
        }
        c.start_zookeeper()?;
        for i in 0..c.servers.len() {
            c.write_config(i)?;
            c.spawn_server(i)?;
        }
        for i in 0..c.servers.len() {
            c.wait_server(i)?;
        }
        Ok(c)
    }

    pub fn start_zookeeper(&mut self) -> Res<()> {
        let cp = zookeeper_classpath()?;
        let zdir = self.dir.join("zookeeper");
        std::fs::create_dir_all(zdir.join("data")).map_err(|e| e.to_string())?;
        let cfg = zdir.join("zoo.cfg");
        std::fs::write(
            &cfg,
            format!(
                "tickTime=500\ninitLimit=10\nsyncLimit=5\ndataDir={}\nclientPort={}\nclientPortAddress=127.0.0.1\n\
                 admin.enableServer=false\n4lw.commands.whitelist=ruok,stat,mntr\nmaxSessionTimeout=30000\n",
                zdir.join("data").display(),
                self.zk_port
            ),
        )
        .map_err(|e| e.to_string())?;
        let log = std::fs::File::create(zdir.join("zookeeper.log")).map_err(|e| e.to_string())?;
        let child = die_with_parent(&mut Command::new("java"))
            .args(["-Xmx256m", "-XX:+UseSerialGC", "-cp", &cp])
            .arg("-Dorg.slf4j.simpleLogger.defaultLogLevel=warn")
            .arg(format!("-Dzookeeper.log.dir={}", zdir.display()))
            .arg("org.apache.zookeeper.server.quorum.QuorumPeerMain")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| {
                format!("cannot run java for ZooKeeper: {e} (apt-get install zookeeper)")
            })?;
        self.zk = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            // Serving requests, not only up ("ruok" answers before the database is
            // loaded; a ClickHouse 18.16 server whose first ZooKeeper session is refused
            // then can crash in its DDL worker).
            if zk_word(self.zk_port, "stat").is_some_and(|s| s.contains("Mode:")) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!(
            "ZooKeeper did not answer on 127.0.0.1:{} within 60 s; see {}",
            self.zk_port,
            zdir.join("zookeeper.log").display()
        ))
    }

    /// Stops ZooKeeper (SIGTERM; its data stays for [`LocalCluster::start_zookeeper`]).
    pub fn stop_zookeeper(&mut self) {
        kill(&mut self.zk, libc::SIGTERM);
    }

    /// The XML of `remote_servers`, `zookeeper` and `macros` for server `i`.
    fn overrides(&self, i: usize) -> String {
        let me = &self.servers[i];
        let mut shards = String::new();
        let n_shards = self.servers.iter().map(|s| s.shard).max().unwrap_or(0);
        for s in 1..=n_shards {
            shards.push_str(
                "      <shard>\n        <internal_replication>true</internal_replication>\n",
            );
            for r in self.servers.iter().filter(|x| x.shard == s) {
                shards.push_str(&format!(
                    "        <replica><host>127.0.0.1</host><port>{}</port></replica>\n",
                    r.tcp_port
                ));
            }
            shards.push_str("      </shard>\n");
        }
        format!(
            "<?xml version=\"1.0\"?>\n<yandex>\n  <remote_servers>\n    <{CLUSTER}>\n{shards}    </{CLUSTER}>\n  </remote_servers>\n  \
             <zookeeper>\n    <node><host>127.0.0.1</host><port>{zk}</port></node>\n    <session_timeout_ms>10000</session_timeout_ms>\n  </zookeeper>\n  \
             <macros>\n    <shard>{s}</shard>\n    <replica>{name}</replica>\n  </macros>\n  \
             <interserver_http_host>127.0.0.1</interserver_http_host>\n</yandex>\n",
            zk = self.zk_port,
            s = me.shard,
            name = me.name(),
        )
    }

    fn write_config(&self, i: usize) -> Res<()> {
        let d = &self.servers[i].dir;
        for sub in ["tmp", "user_files", "format_schemas", "log", "config.d"] {
            std::fs::create_dir_all(d.join(sub)).map_err(|e| e.to_string())?;
        }
        for f in ["config.xml", "users.xml"] {
            let src = Path::new("/etc/clickhouse-server").join(f);
            std::fs::copy(&src, d.join(f)).map_err(|e| {
                format!(
                    "cannot copy {}: {e} (apt-get install clickhouse-server)",
                    src.display()
                )
            })?;
        }
        std::fs::write(d.join("config.d/cluster.xml"), self.overrides(i)).map_err(|e| e.to_string())
    }

    fn spawn_server(&mut self, i: usize) -> Res<()> {
        let s = &self.servers[i];
        let d = s.dir.display().to_string();
        let err = std::fs::File::create(s.dir.join("log/stderr.log")).map_err(|e| e.to_string())?;
        let child = die_with_parent(&mut Command::new(&self.binary))
            .arg(format!("--config-file={d}/config.xml"))
            .arg("--")
            .arg(format!("--path={d}/"))
            .arg(format!("--tmp_path={d}/tmp/"))
            .arg(format!("--user_files_path={d}/user_files/"))
            .arg(format!("--format_schema_path={d}/format_schemas/"))
            .arg(format!("--logger.log={d}/log/clickhouse-server.log"))
            .arg(format!(
                "--logger.errorlog={d}/log/clickhouse-server.err.log"
            ))
            .arg("--logger.level=information")
            .arg(format!("--http_port={}", s.http_port))
            .arg(format!("--tcp_port={}", s.tcp_port))
            .arg(format!("--interserver_http_port={}", s.inter_port))
            .arg("--listen_host=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.binary))?;
        self.servers[i].child = Some(child);
        Ok(())
    }

    fn wait_server(&mut self, i: usize) -> Res<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = &mut self.servers[i];
            if let Some(c) = s.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    return Err(format!(
                        "ClickHouse {} exited during start ({st}); see {}/log/",
                        s.name(),
                        s.dir.display()
                    ));
                }
            }
            if ping(s.http_port) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "ClickHouse {} did not answer within 60 s; see {}/log/",
                    s.name(),
                    s.dir.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn index(&self, shard: usize, replica: usize) -> usize {
        self.servers
            .iter()
            .position(|s| s.shard == shard && s.replica == replica)
            .expect("a server of this cluster")
    }

    pub fn server(&self, shard: usize, replica: usize) -> &Server {
        &self.servers[self.index(shard, replica)]
    }

    /// Stops one server (SIGTERM); its data stays.
    pub fn stop_server(&mut self, shard: usize, replica: usize) {
        let i = self.index(shard, replica);
        kill(&mut self.servers[i].child, libc::SIGTERM);
    }

    /// Starts a stopped server again on its ports and data.
    pub fn start_server(&mut self, shard: usize, replica: usize) -> Res<()> {
        let i = self.index(shard, replica);
        self.spawn_server(i)?;
        self.wait_server(i)
    }

    /// Adds a shard of `replicas` new servers: starts them with the cluster's new
    /// `remote_servers`, and rewrites that of every running server (ClickHouse reloads it
    /// within seconds). Returns the new shard's number. The new servers have no tables: an
    /// aggregator creates them when it next starts (`aggregator run` checks every server).
    pub fn add_shard(&mut self, replicas: usize) -> Res<usize> {
        let shard = self.servers.iter().map(|s| s.shard).max().unwrap_or(0) + 1;
        let first = self.servers.len();
        for r in 1..=replicas {
            self.servers.push(Server {
                shard,
                replica: r,
                http_port: free_port()?,
                tcp_port: free_port()?,
                inter_port: free_port()?,
                dir: self.dir.join(format!("s{shard}r{r}")),
                child: None,
            });
        }
        for i in 0..first {
            std::fs::write(
                self.servers[i].dir.join("config.d/cluster.xml"),
                self.overrides(i),
            )
            .map_err(|e| e.to_string())?;
        }
        for i in first..self.servers.len() {
            self.write_config(i)?;
            self.spawn_server(i)?;
        }
        for i in first..self.servers.len() {
            self.wait_server(i)?;
        }
        Ok(shard)
    }

    /// Process ids of ZooKeeper and the servers (for CPU accounting).
    pub fn pids(&self) -> Vec<u32> {
        self.zk
            .iter()
            .chain(self.servers.iter().filter_map(|s| s.child.as_ref()))
            .map(|c| c.id())
            .collect()
    }

    pub fn stop_all(&mut self) {
        for s in &mut self.servers {
            kill(&mut s.child, libc::SIGTERM);
        }
        self.stop_zookeeper();
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.stop_all();
    }
}
