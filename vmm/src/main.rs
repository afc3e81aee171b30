//! The `vmm` binary: parses the command line, then boots a Linux kernel (or runs a built-in test
//! guest) and runs the event loop for the console and signals until the VM ends.

use std::fs::File;
use std::io::{LineWriter, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use log::{debug, info, warn};

use vmm::arch::x86_64::{acpi, configure_vcpu, mptable};
use vmm::boot::{self, BootSpec, KernelImage};
use vmm::cli::{self, Cli, SerialTarget};
use vmm::devices::i8042::{I8042, I8042_COMMAND, I8042_DATA};
use vmm::devices::serial::{SerialDevice, COM1_BASE, COM1_IRQ, COM1_LAST};
use vmm::devices::PioBus;
use vmm::memory::{human, GuestRam};
use vmm::vcpu::{ExitRequest, VmControl, EXIT_OK};
use vmm::vm::{self, Vm};

fn main() {
    let started = Instant::now();
    let cli = match cli::parse_from(std::env::args_os()) {
        Ok(c) => c,
        Err((msg, 0)) => {
            print!("{msg}");
            std::process::exit(0);
        }
        Err((msg, code)) => {
            eprintln!("{msg}");
            std::process::exit(code);
        }
    };
    env_logger::Builder::new()
        .filter_level(cli.log_level)
        .format_timestamp_millis()
        .init();
    let code = match run(cli, started) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            1
        }
    };
    std::process::exit(code);
}

/// The error and its causes on one line, skipping a cause whose text the message already quotes.
fn one_line(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg.replace('\n', " ")
}

/// Logs (at debug level) how long after `main` started each start-up step ended, so the host's
/// share of the time to the guest's first instruction can be read from `--log-level debug`.
struct StartupClock(Instant);

impl StartupClock {
    fn mark(&self, step: &str) {
        debug!("start-up: {step} done at {:.1?}", self.0.elapsed());
    }
}

fn run(cli: Cli, started: Instant) -> Result<i32> {
    let clock = StartupClock(started);
    if cli.guest_args.guest.is_some() {
        return vmm::guest::run_on(&cli.guest_args, cli.mem, cli.cpus, cli.backing()?);
    }
    let Some(kernel_path) = cli.kernel.as_deref() else {
        bail!("no kernel given: pass --kernel PATH (a bzImage or vmlinux) or --guest NAME");
    };
    check_host_memory(cli.mem)?;
    let kernel = KernelImage::from_file(kernel_path)?;
    kernel.check_fits(cli.mem)?;
    clock.mark("kernel file read");
    let initrd = match &cli.initrd {
        Some(p) => Some(
            std::fs::read(p).map_err(|source| boot::BootError::ReadInitrd {
                path: p.clone(),
                source,
            })?,
        ),
        None => None,
    };
    if let Some(data) = &initrd {
        kernel.check_initrd_fits(cli.mem, data.len() as u64)?;
    }
    {
        let kvm = vm::open_kvm()?;
        let max = vm::max_vcpus(&kvm);
        if u32::from(cli.cpus) > max {
            return Err(vm::VmError::TooManyCpus {
                asked: cli.cpus.into(),
                max,
            }
            .into());
        }
    }

    let ram = GuestRam::new(cli.mem, cli.backing()?)?;
    clock.mark("guest RAM mapped");
    let vm = Vm::new(&ram, cli.cpus)?;
    clock.mark("VM created");
    mptable::setup(ram.memory(), cli.cpus)?;
    let rsdp = acpi::setup(ram.memory(), cli.cpus)?;
    let spec = BootSpec {
        kernel: &kernel,
        initrd: initrd.as_deref(),
        cmdline: &cli.cmdline,
        fast_boot: !cli.no_fast_boot,
        acpi_rsdp: Some(rsdp),
    };
    let loaded = boot::load(&ram, &spec)?;
    drop(kernel);
    clock.mark("kernel loaded");

    let exit = ExitRequest::new().context("cannot create the exit event fd")?;
    let out: Box<dyn Write + Send> = match &cli.serial {
        SerialTarget::Stdio => Box::new(FlushingStdout),
        SerialTarget::File(p) => Box::new(LineWriter::new(File::create(p).with_context(|| {
            format!(
                "cannot create serial output file {}: check --serial file:PATH",
                p.display()
            )
        })?)),
    };
    let (serial, irq) =
        SerialDevice::with_new_irq(out).context("cannot create the serial IRQ event fd")?;
    let serial = Arc::new(serial);
    vm.fd()
        .register_irqfd(&irq, COM1_IRQ)
        .context("KVM_IRQFD for the serial IRQ failed")?;
    let mut bus = PioBus::new();
    bus.register(COM1_BASE..=COM1_LAST, serial.clone())?;
    let i8042 = Arc::new(I8042::new(exit.clone()));
    bus.register(I8042_DATA..=I8042_DATA, i8042.clone())?;
    bus.register(I8042_COMMAND..=I8042_COMMAND, i8042)?;

    let mut fds = Vec::with_capacity(cli.cpus.into());
    for id in 0..cli.cpus {
        let fd = vm.create_vcpu(id)?;
        configure_vcpu(&vm, &fd, id)?;
        if id == 0 {
            boot::setup_boot_cpu(ram.memory(), &fd, &loaded)?;
        }
        fds.push(fd);
    }
    let signals = SignalFd::new().context("cannot set up SIGINT/SIGTERM handling")?;
    info!(
        "starting {} vCPU(s), {} RAM on {}, {}",
        cli.cpus,
        human(ram.size()),
        ram.backing(),
        loaded.path
    );
    clock.mark("vCPUs configured");
    let mut ctl = VmControl::start(fds, Arc::new(bus), ram.memory().clone(), exit.clone())?;
    let code = event_loop(
        &exit,
        signals,
        matches!(cli.serial, SerialTarget::Stdio).then_some(serial),
    )?;
    ctl.stop_all();
    let _ = std::io::stdout().flush();
    info!("VM ended with exit code {code}");
    drop(ctl);
    drop(vm);
    drop(ram);
    Ok(code)
}

/// Stdout that flushes every write, so a prompt without a newline shows at once.
struct FlushingStdout;

impl Write for FlushingStdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = std::io::stdout().lock();
        out.write_all(buf)?;
        out.flush()?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

/// Refuses guest RAM larger than the host's physical memory (an overcommitted guest would be
/// killed by the OOM killer long after start-up).
fn check_host_memory(mem: u64) -> Result<()> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let total_kb: Option<u64> = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
    if let Some(kb) = total_kb {
        let total = kb * 1024;
        if mem > total {
            bail!(
                "--mem {} is more than this host's {} MiB of RAM: lower --mem",
                human(mem),
                total >> 20
            );
        }
    }
    Ok(())
}

/// SIGINT and SIGTERM as a readable fd (blocked for every thread spawned after this).
struct SignalFd {
    fd: OwnedFd,
}

impl SignalFd {
    fn new() -> std::io::Result<SignalFd> {
        // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t; the calls only write into it and block the two
        // signals for this thread, which the vCPU threads inherit.
        let fd = unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC)
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: signalfd returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(SignalFd { fd })
    }

    /// Reads one pending signal number, if any.
    fn read(&self) -> Option<u32> {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        // SAFETY: reads at most `info.len()` bytes into a buffer we own.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) };
        (n as usize == info.len())
            .then(|| u32::from_ne_bytes(info[..4].try_into().expect("4 bytes")))
    }
}

/// The terminal settings to restore when stdin is a tty put in non-canonical mode.
struct TtyGuard(Option<libc::termios>);

impl TtyGuard {
    fn raw_stdin() -> TtyGuard {
        let fd = libc::STDIN_FILENO;
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return TtyGuard(None);
        }
        // SAFETY: termios is plain data filled in by tcgetattr.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `t` is a valid termios for tcgetattr/tcsetattr on our own stdin.
        unsafe {
            if libc::tcgetattr(fd, &mut t) != 0 {
                return TtyGuard(None);
            }
            let saved = t;
            // Keys go to the guest as typed; ISIG stays so Ctrl-C still stops the VM.
            t.c_lflag &= !(libc::ICANON | libc::ECHO);
            libc::tcsetattr(fd, libc::TCSANOW, &t);
            TtyGuard(Some(saved))
        }
    }
}

impl Drop for TtyGuard {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            // SAFETY: restores the settings read from the same descriptor.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, t) };
        }
    }
}

/// The VMM's event sources: the exit request, SIGINT/SIGTERM, and stdin for the serial console.
struct Control {
    exit: ExitRequest,
    signals: SignalFd,
    serial: Option<Arc<SerialDevice>>,
    stdin_open: bool,
}

const STDIN: RawFd = libc::STDIN_FILENO;

impl MutEventSubscriber for Control {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.exit.eventfd(), EventSet::IN)) {
            warn!("cannot watch the exit event: {e:?}");
        }
        if let Err(e) = ops.add(Events::new(&self.signals.fd, EventSet::IN)) {
            warn!("cannot watch SIGINT/SIGTERM: {e:?}");
        }
        if self.serial.is_some() {
            match ops.add(Events::new_raw(STDIN, EventSet::IN)) {
                Ok(()) => self.stdin_open = true,
                Err(e) => debug!("stdin is not pollable ({e:?}); no serial input"),
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.exit.eventfd().as_raw_fd() {
            let _ = self.exit.eventfd().read();
        } else if fd == self.signals.fd.as_raw_fd() {
            while let Some(sig) = self.signals.read() {
                let name = if sig == libc::SIGINT as u32 {
                    "SIGINT"
                } else {
                    "SIGTERM"
                };
                self.exit.request(EXIT_OK, &format!("{name} received"));
            }
        } else if fd == STDIN {
            let Some(serial) = &self.serial else { return };
            let room = serial.input_capacity();
            if room == 0 {
                return; // the guest has not drained its FIFO; epoll will report stdin again
            }
            let mut buf = vec![0u8; room];
            // SAFETY: stdin stays open for the life of the process; read into our buffer.
            let mut stdin = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(STDIN) });
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    debug!("stdin closed; no more serial input");
                    let _ = ops.remove(events);
                    self.stdin_open = false;
                }
                Ok(n) => {
                    serial.enqueue_input(&buf[..n]);
                }
            }
        }
    }
}

fn event_loop(
    exit: &ExitRequest,
    signals: SignalFd,
    serial: Option<Arc<SerialDevice>>,
) -> Result<i32> {
    let _tty = serial.as_ref().map(|_| TtyGuard::raw_stdin());
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber>>>::new()
        .map_err(|e| anyhow::anyhow!("cannot create the event loop: {e:?}"))?;
    let control = Arc::new(Mutex::new(Control {
        exit: exit.clone(),
        signals,
        serial,
        stdin_open: false,
    }));
    em.add_subscriber(control);
    loop {
        if let Some(code) = exit.code() {
            return Ok(code);
        }
        if let Err(e) = em.run_with_timeout(500) {
            warn!("event loop: {e:?}");
        }
    }
}
