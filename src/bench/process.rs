//! Processes the bench measures: a spawned server (its CPU time, memory and open files from
//! /proc), the generator itself, CPU pinning, the open-file limit and the machine's
//! description.
//!
//! Linux only: everything is read from /proc. Elsewhere the readings are `None`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde::Serialize;

/// CPU time of a process: the sum of its threads' run time from /proc/PID/task/*/schedstat
/// (nanoseconds), or user + system time from /proc/PID/stat (clock ticks, usually 10 ms) where
/// schedstat is missing. Threads that already exited are not in the sum; the servers measured
/// keep their threads.
pub fn cpu_time(pid: &str) -> Option<Duration> {
    schedstat_time(pid).or_else(|| stat_time(pid))
}

fn schedstat_time(pid: &str) -> Option<Duration> {
    let mut nanos = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = task.ok()?.path().join("schedstat");
        let Ok(text) = std::fs::read_to_string(path) else {
            continue; // the thread ended between the listing and the read
        };
        nanos += text.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(Duration::from_nanos(nanos))
}

fn stat_time(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after it are plain numbers.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf only reads a constant of the running system.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = if ticks > 0 { ticks as u64 } else { 100 };
    Some(Duration::from_micros((utime + stime) * 1_000_000 / ticks))
}

/// Resident memory of a process: (current VmRSS, peak VmHWM), in bytes.
pub fn memory(pid: &str) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Open file descriptors of a process: the entries of /proc/PID/fd.
pub fn open_fds(pid: &str) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// Pins every thread of this process to `cpu` (threads started later inherit it).
pub fn pin_self(cpu: usize) -> std::io::Result<()> {
    for task in std::fs::read_dir("/proc/self/task")? {
        let tid: libc::pid_t = task?
            .file_name()
            .to_string_lossy()
            .parse()
            .map_err(std::io::Error::other)?;
        set_affinity(tid, cpu)?;
    }
    Ok(())
}

fn set_affinity(tid: libc::pid_t, cpu: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it; sched_setaffinity reads it.
    let result = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Raises this process's open-file limit to its hard limit (children inherit it); returns
/// the new soft limit.
pub fn raise_open_files() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(_) => rlimit::getrlimit(rlimit::Resource::NOFILE)
            .map(|(soft, _)| soft)
            .unwrap_or(1024),
    }
}

/// A `switchyard` server (or the baseline) started as a child process.
#[derive(Debug)]
pub struct Spawned {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its pid, as a string for /proc paths.
    pub pid: String,
}

impl Spawned {
    /// Starts `exe args... --addr 127.0.0.1:0` and reads the address from its first line of
    /// output (`... listening on http://ADDR/`, or `https://`). With `pin`, the child runs on that CPU only.
    pub fn start(exe: &Path, args: &[&str], pin: Option<usize>) -> Result<Spawned, String> {
        let mut command = Command::new(exe);
        command
            .args(args)
            .args(["--addr", "127.0.0.1:0"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(cpu) = pin {
            use std::os::unix::process::CommandExt;
            // SAFETY: between fork and exec this only calls sched_setaffinity, which is
            // async-signal-safe.
            unsafe {
                command.pre_exec(move || set_affinity(0, cpu));
            }
        }
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
        let stdout = child.stdout.take().ok_or("no stdout from the server")?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .map_err(|e| format!("reading the server's address: {e}"))?;
        let addr = line
            .split("://")
            .nth(1)
            .map(|rest| rest.trim().trim_end_matches('/'))
            .and_then(|addr| addr.parse().ok())
            .ok_or_else(|| format!("the server printed {line:?}, not its address"))?;
        let pid = child.id().to_string();
        Ok(Spawned { child, addr, pid })
    }

    /// CPU time used so far.
    pub fn cpu_time(&self) -> Option<Duration> {
        cpu_time(&self.pid)
    }

    /// (VmRSS, VmHWM) in bytes.
    pub fn memory(&self) -> Option<(u64, u64)> {
        memory(&self.pid)
    }

    /// Open file descriptors (sockets, the listener, files).
    pub fn open_fds(&self) -> Option<u64> {
        open_fds(&self.pid)
    }

    /// Stops the server with SIGTERM, then SIGKILL if it is still there after 6 s.
    pub fn stop(mut self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: signalling our own child, which has not been reaped yet.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        for _ in 0..60 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The machine the bench ran on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// CPUs this process may run on.
    pub cores: usize,
    /// `model name` from /proc/cpuinfo.
    pub cpu_model: String,
    /// /proc/sys/kernel/osrelease.
    pub kernel: String,
}

impl Machine {
    /// Reads the machine's description.
    pub fn read() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, model)| model.trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|k| k.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into());
        Machine {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            kernel,
        }
    }
}
