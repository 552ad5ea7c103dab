//! The libvirt C library, loaded at run time, behind a small safe API.
//!
//! This is the only module of the crate with `unsafe` code. The library (`libvirt.so.0`, from
//! Debian's `libvirt0`) is opened with `dlopen` the first time a connection is made, so the
//! workspace builds and runs without libvirt installed; only `cairn host-agent --libvirt` needs
//! it, and it fails with a clear message where it is missing.
//!
//! Only the calls the driver uses are bound, each with the exact C signature from libvirt's
//! public headers (`libvirt-domain.h`, `libvirt-domain-checkpoint.h`, `virterror.h`), all of
//! them stable since libvirt 7.6.
//!
//! Ownership follows libvirt's rules: every object pointer a call returns is owned by one
//! wrapper ([`Connect`], [`Domain`], [`Checkpoint`]) that frees it once on drop; strings libvirt
//! returns as `char *` are copied and released with `free`; strings it returns as
//! `const char *` belong to the object and are only copied. libvirt's objects are reference
//! counted and thread safe, so the wrappers are `Send` and `Sync`. Errors are read right after
//! the failing call from libvirt's thread-local last error, on the same thread.

#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_ulong, c_ulonglong, c_ushort, c_void};
use std::sync::OnceLock;

/// An error libvirt reported (its code from `virErrorNumber` and its message), or a failure
/// to load the library.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct LibvirtError {
    /// libvirt's `virErrorNumber`; `-1` when the library could not be loaded or gave none.
    pub code: i32,
    pub message: String,
}

impl LibvirtError {
    fn new(message: impl Into<String>) -> Self {
        Self {
            code: -1,
            message: message.into(),
        }
    }
}

/// `VIR_ERR_NO_DOMAIN`: the domain does not exist (any more).
pub const ERR_NO_DOMAIN: i32 = 42;
/// `VIR_ERR_OPERATION_INVALID`: e.g. the domain is not running.
pub const ERR_OPERATION_INVALID: i32 = 55;
/// `VIR_ERR_NO_DOMAIN_CHECKPOINT`.
pub const ERR_NO_DOMAIN_CHECKPOINT: i32 = 103;
/// `VIR_ERR_NO_DOMAIN_BACKUP`: no backup job runs.
pub const ERR_NO_DOMAIN_BACKUP: i32 = 104;

/// `VIR_DOMAIN_XML_INACTIVE`: the persistent configuration, not the live one.
pub const XML_INACTIVE: c_uint = 1 << 1;
/// `VIR_DOMAIN_START_PAUSED`.
pub const START_PAUSED: c_uint = 1;
/// `VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE`.
pub const CHECKPOINT_REDEFINE: c_uint = 1;
/// `VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE`: check the bitmaps really exist.
pub const CHECKPOINT_REDEFINE_VALIDATE: c_uint = 1 << 2;
/// `VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN`.
pub const CHECKPOINT_XML_NO_DOMAIN: c_uint = 1 << 1;
/// `VIR_DOMAIN_CHECKPOINT_XML_SIZE`: each disk's bytes written since the checkpoint.
pub const CHECKPOINT_XML_SIZE: c_uint = 1 << 2;
/// `VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY`.
pub const CHECKPOINT_DELETE_METADATA_ONLY: c_uint = 1 << 1;
/// `VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA`.
pub const UNDEFINE_METADATA: c_uint = (1 << 1) | (1 << 4);

/// `virDomainState` values.
pub mod state {
    pub const RUNNING: i32 = 1;
    pub const BLOCKED: i32 = 2;
    pub const PAUSED: i32 = 3;
    pub const SHUTDOWN: i32 = 4;
    pub const SHUTOFF: i32 = 5;
    pub const CRASHED: i32 = 6;
    pub const PMSUSPENDED: i32 = 7;
}

type Ptr = *mut c_void;

#[repr(C)]
struct RawError {
    code: c_int,
    domain: c_int,
    message: *mut c_char,
}

#[repr(C)]
#[derive(Default)]
struct RawDomainInfo {
    state: u8,
    max_mem: c_ulong,
    memory: c_ulong,
    nr_virt_cpu: c_ushort,
    cpu_time: c_ulonglong,
}

#[repr(C)]
#[derive(Default)]
struct RawBlockInfo {
    capacity: c_ulonglong,
    allocation: c_ulonglong,
    physical: c_ulonglong,
}

#[repr(C)]
struct RawFsInfo {
    mountpoint: *mut c_char,
    name: *mut c_char,
    fstype: *mut c_char,
    ndev_alias: usize,
    dev_alias: *mut *mut c_char,
}

macro_rules! bindings {
    ($($field:ident = $sym:literal : fn($($arg:ty),*) -> $ret:ty;)*) => {
        #[allow(non_snake_case)]
        struct Fns {
            $($field: unsafe extern "C" fn($($arg),*) -> $ret,)*
        }

        impl Fns {
            /// Resolves every symbol from `handle`.
            ///
            /// # Safety
            /// `handle` must be a live `dlopen` handle of libvirt, whose symbols have the
            /// signatures declared above.
            unsafe fn load(handle: Ptr) -> Result<Self, LibvirtError> {
                Ok(Self {
                    $($field: {
                        let name = concat!($sym, "\0");
                        // SAFETY: `name` is NUL-terminated; `handle` is live (caller).
                        let sym = unsafe { libc::dlsym(handle, name.as_ptr().cast()) };
                        if sym.is_null() {
                            return Err(LibvirtError::new(format!(
                                "libvirt.so.0 lacks {} (libvirt 7.6 or newer is needed)",
                                $sym
                            )));
                        }
                        // SAFETY: the symbol is libvirt's function of this exact signature
                        // (from its public headers); a data pointer and a function pointer
                        // have the same size on every platform libvirt supports.
                        unsafe {
                            std::mem::transmute::<Ptr, unsafe extern "C" fn($($arg),*) -> $ret>(sym)
                        }
                    },)*
                })
            }
        }
    };
}

bindings! {
    initialize = "virInitialize": fn() -> c_int;
    get_last_error = "virGetLastError": fn() -> *mut RawError;
    reset_last_error = "virResetLastError": fn() -> ();
    set_error_func = "virSetErrorFunc": fn(Ptr, Option<unsafe extern "C" fn(Ptr, *mut RawError)>) -> ();
    connect_open = "virConnectOpen": fn(*const c_char) -> Ptr;
    connect_close = "virConnectClose": fn(Ptr) -> c_int;
    connect_is_alive = "virConnectIsAlive": fn(Ptr) -> c_int;
    connect_lib_version = "virConnectGetLibVersion": fn(Ptr, *mut c_ulong) -> c_int;
    list_all_domains = "virConnectListAllDomains": fn(Ptr, *mut *mut Ptr, c_uint) -> c_int;
    lookup_by_uuid = "virDomainLookupByUUIDString": fn(Ptr, *const c_char) -> Ptr;
    lookup_by_name = "virDomainLookupByName": fn(Ptr, *const c_char) -> Ptr;
    define_xml = "virDomainDefineXML": fn(Ptr, *const c_char) -> Ptr;
    domain_free = "virDomainFree": fn(Ptr) -> c_int;
    domain_name = "virDomainGetName": fn(Ptr) -> *const c_char;
    domain_uuid = "virDomainGetUUIDString": fn(Ptr, *mut c_char) -> c_int;
    domain_xml = "virDomainGetXMLDesc": fn(Ptr, c_uint) -> *mut c_char;
    domain_state = "virDomainGetState": fn(Ptr, *mut c_int, *mut c_int, c_uint) -> c_int;
    domain_info = "virDomainGetInfo": fn(Ptr, *mut RawDomainInfo) -> c_int;
    domain_block_info = "virDomainGetBlockInfo": fn(Ptr, *const c_char, *mut RawBlockInfo, c_uint) -> c_int;
    domain_is_persistent = "virDomainIsPersistent": fn(Ptr) -> c_int;
    domain_is_active = "virDomainIsActive": fn(Ptr) -> c_int;
    domain_create = "virDomainCreateWithFlags": fn(Ptr, c_uint) -> c_int;
    domain_destroy = "virDomainDestroy": fn(Ptr) -> c_int;
    domain_undefine = "virDomainUndefineFlags": fn(Ptr, c_uint) -> c_int;
    domain_suspend = "virDomainSuspend": fn(Ptr) -> c_int;
    domain_resume = "virDomainResume": fn(Ptr) -> c_int;
    fs_freeze = "virDomainFSFreeze": fn(Ptr, *const *const c_char, c_uint, c_uint) -> c_int;
    fs_thaw = "virDomainFSThaw": fn(Ptr, *const *const c_char, c_uint, c_uint) -> c_int;
    agent_timeout = "virDomainAgentSetResponseTimeout": fn(Ptr, c_int, c_uint) -> c_int;
    guest_time = "virDomainGetTime": fn(Ptr, *mut i64, *mut c_uint, c_uint) -> c_int;
    fs_info = "virDomainGetFSInfo": fn(Ptr, *mut *mut *mut RawFsInfo, c_uint) -> c_int;
    fs_info_free = "virDomainFSInfoFree": fn(*mut RawFsInfo) -> ();
    backup_begin = "virDomainBackupBegin": fn(Ptr, *const c_char, *const c_char, c_uint) -> c_int;
    backup_xml = "virDomainBackupGetXMLDesc": fn(Ptr, c_uint) -> *mut c_char;
    abort_job = "virDomainAbortJob": fn(Ptr) -> c_int;
    checkpoint_create = "virDomainCheckpointCreateXML": fn(Ptr, *const c_char, c_uint) -> Ptr;
    checkpoint_lookup = "virDomainCheckpointLookupByName": fn(Ptr, *const c_char, c_uint) -> Ptr;
    list_checkpoints = "virDomainListAllCheckpoints": fn(Ptr, *mut *mut Ptr, c_uint) -> c_int;
    checkpoint_name = "virDomainCheckpointGetName": fn(Ptr) -> *const c_char;
    checkpoint_xml = "virDomainCheckpointGetXMLDesc": fn(Ptr, c_uint) -> *mut c_char;
    checkpoint_delete = "virDomainCheckpointDelete": fn(Ptr, c_uint) -> c_int;
    checkpoint_free = "virDomainCheckpointFree": fn(Ptr) -> c_int;
}

struct Lib {
    fns: Fns,
}

/// libvirt's error callback: silent.
unsafe extern "C" fn quiet(_user: Ptr, _error: *mut RawError) {}

fn lib() -> Result<&'static Lib, LibvirtError> {
    static LIB: OnceLock<Result<Lib, LibvirtError>> = OnceLock::new();
    LIB.get_or_init(|| {
        // SAFETY: a NUL-terminated library name; the handle is never closed, so the function
        // pointers taken from it stay valid for the life of the process.
        let handle = unsafe { libc::dlopen(c"libvirt.so.0".as_ptr(), libc::RTLD_NOW) };
        if handle.is_null() {
            return Err(LibvirtError::new(
                "cannot load libvirt.so.0: install libvirt (Debian: libvirt0)",
            ));
        }
        // SAFETY: `handle` is libvirt's, just opened and never closed.
        let fns = unsafe { Fns::load(handle)? };
        // SAFETY: virInitialize takes no arguments and may be called more than once.
        if unsafe { (fns.initialize)() } < 0 {
            return Err(LibvirtError::new("virInitialize failed"));
        }
        // SAFETY: a handler that ignores its arguments; libvirt then stops printing every
        // error on stderr (the driver reports them itself, read from virGetLastError).
        unsafe { (fns.set_error_func)(std::ptr::null_mut(), Some(quiet)) };
        Ok(Lib { fns })
    })
    .as_ref()
    .map_err(Clone::clone)
}

impl Lib {
    /// The calling thread's last libvirt error, which it then clears.
    fn error(&self, what: &str) -> LibvirtError {
        // SAFETY: virGetLastError returns NULL or a pointer to this thread's error object,
        // valid until the next libvirt call on this thread; we copy out of it before that.
        let raw = unsafe { (self.fns.get_last_error)() };
        let err = if raw.is_null() {
            LibvirtError::new(format!("{what} failed (libvirt gave no reason)"))
        } else {
            // SAFETY: `raw` is non-null and points to a virError (see above).
            let (code, msg) = unsafe { ((*raw).code, (*raw).message) };
            let message = if msg.is_null() {
                format!("{what} failed (libvirt error {code})")
            } else {
                // SAFETY: libvirt's message is a NUL-terminated string owned by the error.
                unsafe { CStr::from_ptr(msg) }
                    .to_string_lossy()
                    .into_owned()
            };
            LibvirtError { code, message }
        };
        // SAFETY: no arguments; clears this thread's error.
        unsafe { (self.fns.reset_last_error)() };
        err
    }

    /// Copies and frees a `char *` libvirt handed over; NULL is the call's error.
    fn owned_string(&self, p: *mut c_char, what: &str) -> Result<String, LibvirtError> {
        if p.is_null() {
            return Err(self.error(what));
        }
        // SAFETY: libvirt returned a NUL-terminated, malloc'ed string that we now own.
        let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
        // SAFETY: freed exactly once, with the allocator libvirt used (the C library's).
        unsafe { libc::free(p.cast()) };
        Ok(s)
    }

    fn check(&self, rc: c_int, what: &str) -> Result<c_int, LibvirtError> {
        if rc < 0 {
            Err(self.error(what))
        } else {
            Ok(rc)
        }
    }
}

/// `virDomainQemuAgentCommand`, from `libvirt-qemu.so.0` (shipped beside `libvirt.so.0`).
type AgentCommandFn = unsafe extern "C" fn(Ptr, *const c_char, c_int, c_uint) -> *mut c_char;

fn agent_command_fn() -> Result<AgentCommandFn, LibvirtError> {
    static F: OnceLock<Result<AgentCommandFn, LibvirtError>> = OnceLock::new();
    F.get_or_init(|| {
        lib()?;
        // SAFETY: a NUL-terminated library name; the handle is never closed, so the function
        // pointer taken from it stays valid for the life of the process.
        let handle = unsafe { libc::dlopen(c"libvirt-qemu.so.0".as_ptr(), libc::RTLD_NOW) };
        if handle.is_null() {
            return Err(LibvirtError::new(
                "cannot load libvirt-qemu.so.0: install libvirt (Debian: libvirt0)",
            ));
        }
        // SAFETY: a NUL-terminated symbol name of a live handle.
        let sym = unsafe { libc::dlsym(handle, c"virDomainQemuAgentCommand".as_ptr()) };
        if sym.is_null() {
            return Err(LibvirtError::new(
                "libvirt-qemu.so.0 lacks virDomainQemuAgentCommand",
            ));
        }
        // SAFETY: libvirt-qemu.h declares `char *virDomainQemuAgentCommand(virDomainPtr,
        // const char *, int, unsigned int)`; data and function pointers have one size.
        Ok(unsafe { std::mem::transmute::<Ptr, AgentCommandFn>(sym) })
    })
    .clone()
}

fn cstring(s: &str) -> Result<CString, LibvirtError> {
    CString::new(s).map_err(|_| LibvirtError::new(format!("{s:?} contains a NUL byte")))
}

/// Takes ownership of an array of object pointers libvirt allocated (`n` entries).
///
/// # Safety
/// `list` must be the array a `virConnectListAll*`/`virDomainListAll*` call returned with `n`.
unsafe fn take_list(list: *mut Ptr, n: c_int) -> Vec<Ptr> {
    if list.is_null() {
        return Vec::new();
    }
    let n = usize::try_from(n).unwrap_or(0);
    // SAFETY: libvirt wrote `n` pointers to `list` (caller's contract).
    let out = unsafe { std::slice::from_raw_parts(list, n) }.to_vec();
    // SAFETY: the array itself is ours to free; its entries now belong to `out`.
    unsafe { libc::free(list.cast()) };
    out
}

/// A connection to a libvirt daemon (`virConnectPtr`).
pub struct Connect {
    lib: &'static Lib,
    ptr: Ptr,
}

// SAFETY: libvirt connections may be used from any thread concurrently (libvirt serializes
// internally); the pointer is only freed in Drop.
unsafe impl Send for Connect {}
// SAFETY: as above.
unsafe impl Sync for Connect {}

impl std::fmt::Debug for Connect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Connect")
    }
}

impl Connect {
    /// Opens `uri` (e.g. `qemu:///system`) read-write.
    pub fn open(uri: &str) -> Result<Self, LibvirtError> {
        let lib = lib()?;
        let c = cstring(uri)?;
        // SAFETY: a valid C string; NULL is the error.
        let ptr = unsafe { (lib.fns.connect_open)(c.as_ptr()) };
        if ptr.is_null() {
            return Err(lib.error(&format!("connect to {uri}")));
        }
        Ok(Self { lib, ptr })
    }

    /// Whether the connection still reaches the daemon (false after libvirtd restarted): one
    /// round trip, because libvirt notices a closed socket only when it next uses it.
    pub fn is_alive(&self) -> bool {
        // SAFETY: `ptr` is a live connection.
        if unsafe { (self.lib.fns.connect_is_alive)(self.ptr) } != 1 {
            return false;
        }
        let mut version: c_ulong = 0;
        // SAFETY: a valid out pointer.
        let rc = unsafe { (self.lib.fns.connect_lib_version)(self.ptr, &mut version) };
        if rc < 0 {
            // Clear the error this probe left on the thread.
            let _ = self.lib.error("probe the connection");
            return false;
        }
        true
    }

    fn domain(&self, ptr: Ptr, what: &str) -> Result<Domain, LibvirtError> {
        if ptr.is_null() {
            return Err(self.lib.error(what));
        }
        Ok(Domain { lib: self.lib, ptr })
    }

    /// Every domain: running, paused and shut off; persistent and transient.
    pub fn domains(&self) -> Result<Vec<Domain>, LibvirtError> {
        let mut list: *mut Ptr = std::ptr::null_mut();
        // SAFETY: `list` receives a malloc'ed array that take_list frees.
        let n = unsafe { (self.lib.fns.list_all_domains)(self.ptr, &mut list, 0) };
        let n = self.lib.check(n, "list domains")?;
        // SAFETY: the array and count just returned.
        let ptrs = unsafe { take_list(list, n) };
        Ok(ptrs
            .into_iter()
            .map(|ptr| Domain { lib: self.lib, ptr })
            .collect())
    }

    pub fn domain_by_uuid(&self, uuid: &str) -> Result<Domain, LibvirtError> {
        let c = cstring(uuid)?;
        // SAFETY: valid connection and C string; NULL is the error.
        let ptr = unsafe { (self.lib.fns.lookup_by_uuid)(self.ptr, c.as_ptr()) };
        self.domain(ptr, &format!("look up domain {uuid}"))
    }

    pub fn domain_by_name(&self, name: &str) -> Result<Domain, LibvirtError> {
        let c = cstring(name)?;
        // SAFETY: valid connection and C string; NULL is the error.
        let ptr = unsafe { (self.lib.fns.lookup_by_name)(self.ptr, c.as_ptr()) };
        self.domain(ptr, &format!("look up domain {name}"))
    }

    /// Defines a persistent domain from its XML.
    pub fn define(&self, xml: &str) -> Result<Domain, LibvirtError> {
        let c = cstring(xml)?;
        // SAFETY: valid connection and C string; NULL is the error.
        let ptr = unsafe { (self.lib.fns.define_xml)(self.ptr, c.as_ptr()) };
        self.domain(ptr, "define the domain")
    }
}

impl Drop for Connect {
    fn drop(&mut self) {
        // SAFETY: `ptr` is ours and released once.
        unsafe { (self.lib.fns.connect_close)(self.ptr) };
    }
}

/// What `virDomainGetInfo` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainInfo {
    pub memory_kib: u64,
    pub vcpus: u32,
    pub cpu_time_ns: u64,
}

/// A domain (`virDomainPtr`).
pub struct Domain {
    lib: &'static Lib,
    ptr: Ptr,
}

// SAFETY: libvirt domain objects are reference counted and thread safe.
unsafe impl Send for Domain {}
// SAFETY: as above.
unsafe impl Sync for Domain {}

impl Domain {
    fn rc(&self, rc: c_int, what: &str) -> Result<(), LibvirtError> {
        self.lib.check(rc, what).map(|_| ())
    }

    pub fn name(&self) -> Result<String, LibvirtError> {
        // SAFETY: the returned string belongs to the domain object; copied at once.
        let p = unsafe { (self.lib.fns.domain_name)(self.ptr) };
        if p.is_null() {
            return Err(self.lib.error("domain name"));
        }
        // SAFETY: non-null, NUL-terminated, alive as long as `self`.
        Ok(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    }

    pub fn uuid(&self) -> Result<String, LibvirtError> {
        // VIR_UUID_STRING_BUFLEN is 37.
        let mut buf = [0 as c_char; 37];
        // SAFETY: `buf` has the length libvirt writes (36 characters and a NUL).
        let rc = unsafe { (self.lib.fns.domain_uuid)(self.ptr, buf.as_mut_ptr()) };
        self.rc(rc, "domain uuid")?;
        // SAFETY: libvirt NUL-terminated it.
        Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned())
    }

    /// The domain XML; with [`XML_INACTIVE`] the persistent configuration.
    pub fn xml(&self, flags: c_uint) -> Result<String, LibvirtError> {
        // SAFETY: returns a string we own, or NULL on error.
        let p = unsafe { (self.lib.fns.domain_xml)(self.ptr, flags) };
        self.lib.owned_string(p, "domain XML")
    }

    /// `(virDomainState, reason)`.
    pub fn state(&self) -> Result<(i32, i32), LibvirtError> {
        let (mut st, mut reason) = (0, 0);
        // SAFETY: two valid out pointers.
        let rc = unsafe { (self.lib.fns.domain_state)(self.ptr, &mut st, &mut reason, 0) };
        self.rc(rc, "domain state")?;
        Ok((st, reason))
    }

    pub fn info(&self) -> Result<DomainInfo, LibvirtError> {
        let mut raw = RawDomainInfo::default();
        // SAFETY: `raw` has virDomainInfo's layout.
        let rc = unsafe { (self.lib.fns.domain_info)(self.ptr, &mut raw) };
        self.rc(rc, "domain info")?;
        // `unsigned long` is 32 bits wide on some platforms libvirt supports.
        #[allow(clippy::useless_conversion)]
        Ok(DomainInfo {
            memory_kib: u64::from(raw.memory),
            vcpus: u32::from(raw.nr_virt_cpu),
            cpu_time_ns: raw.cpu_time,
        })
    }

    /// The guest-visible size of disk `target` (e.g. `vda`) in bytes.
    pub fn disk_capacity(&self, target: &str) -> Result<u64, LibvirtError> {
        let c = cstring(target)?;
        let mut raw = RawBlockInfo::default();
        // SAFETY: valid C string and out struct of virDomainBlockInfo's layout.
        let rc = unsafe { (self.lib.fns.domain_block_info)(self.ptr, c.as_ptr(), &mut raw, 0) };
        self.rc(rc, &format!("block info of {target}"))?;
        Ok(raw.capacity)
    }

    pub fn is_persistent(&self) -> Result<bool, LibvirtError> {
        // SAFETY: a live domain.
        let rc = unsafe { (self.lib.fns.domain_is_persistent)(self.ptr) };
        Ok(self.lib.check(rc, "domain persistence")? == 1)
    }

    /// Whether the domain runs (or is paused).
    pub fn is_active(&self) -> Result<bool, LibvirtError> {
        // SAFETY: a live domain.
        let rc = unsafe { (self.lib.fns.domain_is_active)(self.ptr) };
        Ok(self.lib.check(rc, "domain activity")? == 1)
    }

    /// Starts a defined domain (`flags`: [`START_PAUSED`]).
    pub fn start(&self, flags: c_uint) -> Result<(), LibvirtError> {
        // SAFETY: a live domain.
        let rc = unsafe { (self.lib.fns.domain_create)(self.ptr, flags) };
        self.rc(rc, "start the domain")
    }

    /// Stops the domain at once (power off).
    pub fn destroy(&self) -> Result<(), LibvirtError> {
        // SAFETY: a live domain.
        let rc = unsafe { (self.lib.fns.domain_destroy)(self.ptr) };
        self.rc(rc, "destroy the domain")
    }

    pub fn undefine(&self, flags: c_uint) -> Result<(), LibvirtError> {
        // SAFETY: a live domain.
        let rc = unsafe { (self.lib.fns.domain_undefine)(self.ptr, flags) };
        self.rc(rc, "undefine the domain")
    }

    pub fn suspend(&self) -> Result<(), LibvirtError> {
        // SAFETY: a live domain.
        let rc = unsafe { (self.lib.fns.domain_suspend)(self.ptr) };
        self.rc(rc, "pause the domain")
    }

    pub fn resume(&self) -> Result<(), LibvirtError> {
        // SAFETY: a live domain.
        let rc = unsafe { (self.lib.fns.domain_resume)(self.ptr) };
        self.rc(rc, "resume the domain")
    }

    /// How long libvirt waits for the guest agent (seconds; `-1`: libvirt's default).
    pub fn set_agent_timeout(&self, seconds: i32) -> Result<(), LibvirtError> {
        // SAFETY: a live domain.
        let rc = unsafe { (self.lib.fns.agent_timeout)(self.ptr, seconds, 0) };
        self.rc(rc, "set the guest agent timeout")
    }

    /// Sends one guest-agent command (a JSON object with `execute` and `arguments`) and
    /// returns the agent's whole reply (JSON, with `return`); waits at most `seconds`. An
    /// error reply is libvirt's error, with the agent's message.
    pub fn agent_command(&self, command: &str, seconds: i32) -> Result<String, LibvirtError> {
        let f = agent_command_fn()?;
        let c = cstring(command)?;
        // SAFETY: a live domain and a valid C string; the result is a string we own, or NULL.
        let p = unsafe { f(self.ptr, c.as_ptr(), seconds, 0) };
        self.lib.owned_string(p, "run a guest agent command")
    }

    /// Asks the guest agent for the guest's clock: a ping that any `qemu-ga` answers.
    pub fn agent_ping(&self) -> Result<(), LibvirtError> {
        let (mut secs, mut nsecs) = (0i64, 0 as c_uint);
        // SAFETY: two valid out pointers.
        let rc = unsafe { (self.lib.fns.guest_time)(self.ptr, &mut secs, &mut nsecs, 0) };
        self.rc(rc, "reach the guest agent")
    }

    /// The guest's mounted file systems as its agent reports them: `(mountpoint, type, device)`.
    pub fn fs_info(&self) -> Result<Vec<(String, String, String)>, LibvirtError> {
        let mut list: *mut *mut RawFsInfo = std::ptr::null_mut();
        // SAFETY: `list` receives a malloc'ed array of `n` entries, each freed below with
        // virDomainFSInfoFree and the array with free.
        let n = unsafe { (self.lib.fns.fs_info)(self.ptr, &mut list, 0) };
        let n = self.lib.check(n, "read the guest's file systems")?;
        let ptrs = if list.is_null() {
            Vec::new()
        } else {
            // SAFETY: libvirt wrote `n` entry pointers to `list`.
            let v = unsafe { std::slice::from_raw_parts(list, usize::try_from(n).unwrap_or(0)) }
                .to_vec();
            // SAFETY: the array is ours; its entries now belong to `v`.
            unsafe { libc::free(list.cast()) };
            v
        };
        let text = |p: *mut c_char| {
            if p.is_null() {
                String::new()
            } else {
                // SAFETY: a NUL-terminated string owned by the entry, copied before it is freed.
                unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
            }
        };
        let mut out = Vec::new();
        for p in ptrs {
            if p.is_null() {
                continue;
            }
            // SAFETY: a valid entry libvirt allocated; read, then freed exactly once.
            let e = unsafe { &*p };
            out.push((text(e.mountpoint), text(e.fstype), text(e.name)));
            // SAFETY: as above.
            unsafe { (self.lib.fns.fs_info_free)(p) };
        }
        Ok(out)
    }

    /// Freezes every guest file system through the guest agent; returns how many.
    pub fn fs_freeze(&self) -> Result<u32, LibvirtError> {
        // SAFETY: no mount point list (all file systems).
        let rc = unsafe { (self.lib.fns.fs_freeze)(self.ptr, std::ptr::null(), 0, 0) };
        Ok(u32::try_from(self.lib.check(rc, "freeze the guest file systems")?).unwrap_or(0))
    }

    pub fn fs_thaw(&self) -> Result<(), LibvirtError> {
        // SAFETY: no mount point list (all file systems).
        let rc = unsafe { (self.lib.fns.fs_thaw)(self.ptr, std::ptr::null(), 0, 0) };
        self.rc(rc, "thaw the guest file systems")
    }

    /// Starts a backup job (`<domainbackup>`), creating `checkpoint` (`<domaincheckpoint>`)
    /// atomically with it when given.
    pub fn backup_begin(&self, backup: &str, checkpoint: Option<&str>) -> Result<(), LibvirtError> {
        let b = cstring(backup)?;
        let c = checkpoint.map(cstring).transpose()?;
        let cp = c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
        // SAFETY: valid C strings (or NULL for no checkpoint).
        let rc = unsafe { (self.lib.fns.backup_begin)(self.ptr, b.as_ptr(), cp, 0) };
        self.rc(rc, "begin the backup job")
    }

    /// The running backup job's XML ([`ERR_NO_DOMAIN_BACKUP`] when none runs).
    pub fn backup_xml(&self) -> Result<String, LibvirtError> {
        // SAFETY: returns a string we own, or NULL on error.
        let p = unsafe { (self.lib.fns.backup_xml)(self.ptr, 0) };
        self.lib.owned_string(p, "backup job XML")
    }

    /// Ends the domain's running job (here: the backup job).
    pub fn abort_job(&self) -> Result<(), LibvirtError> {
        // SAFETY: a live domain.
        let rc = unsafe { (self.lib.fns.abort_job)(self.ptr) };
        self.rc(rc, "end the backup job")
    }

    fn checkpoint_of(&self, ptr: Ptr, what: &str) -> Result<Checkpoint, LibvirtError> {
        if ptr.is_null() {
            return Err(self.lib.error(what));
        }
        Ok(Checkpoint { lib: self.lib, ptr })
    }

    /// Creates (or with [`CHECKPOINT_REDEFINE`] restores the metadata of) a checkpoint.
    pub fn create_checkpoint(&self, xml: &str, flags: c_uint) -> Result<Checkpoint, LibvirtError> {
        let c = cstring(xml)?;
        // SAFETY: valid C string; NULL is the error.
        let ptr = unsafe { (self.lib.fns.checkpoint_create)(self.ptr, c.as_ptr(), flags) };
        self.checkpoint_of(ptr, "define the checkpoint")
    }

    pub fn checkpoint(&self, name: &str) -> Result<Checkpoint, LibvirtError> {
        let c = cstring(name)?;
        // SAFETY: valid C string; NULL is the error.
        let ptr = unsafe { (self.lib.fns.checkpoint_lookup)(self.ptr, c.as_ptr(), 0) };
        self.checkpoint_of(ptr, &format!("look up checkpoint {name}"))
    }

    /// Every checkpoint of the domain, whoever made it.
    pub fn checkpoints(&self) -> Result<Vec<Checkpoint>, LibvirtError> {
        let mut list: *mut Ptr = std::ptr::null_mut();
        // SAFETY: `list` receives a malloc'ed array that take_list frees.
        let n = unsafe { (self.lib.fns.list_checkpoints)(self.ptr, &mut list, 0) };
        let n = self.lib.check(n, "list checkpoints")?;
        // SAFETY: the array and count just returned.
        let ptrs = unsafe { take_list(list, n) };
        Ok(ptrs
            .into_iter()
            .map(|ptr| Checkpoint { lib: self.lib, ptr })
            .collect())
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        // SAFETY: `ptr` is ours (one reference) and released once.
        unsafe { (self.lib.fns.domain_free)(self.ptr) };
    }
}

/// A domain checkpoint (`virDomainCheckpointPtr`).
pub struct Checkpoint {
    lib: &'static Lib,
    ptr: Ptr,
}

// SAFETY: reference counted, thread-safe libvirt objects.
unsafe impl Send for Checkpoint {}

impl Checkpoint {
    pub fn name(&self) -> Result<String, LibvirtError> {
        // SAFETY: the string belongs to the checkpoint object; copied at once.
        let p = unsafe { (self.lib.fns.checkpoint_name)(self.ptr) };
        if p.is_null() {
            return Err(self.lib.error("checkpoint name"));
        }
        // SAFETY: non-null, NUL-terminated, alive as long as `self`.
        Ok(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    }

    /// The checkpoint's XML (`flags`: [`CHECKPOINT_XML_SIZE`], [`CHECKPOINT_XML_NO_DOMAIN`]).
    pub fn xml(&self, flags: c_uint) -> Result<String, LibvirtError> {
        // SAFETY: returns a string we own, or NULL on error.
        let p = unsafe { (self.lib.fns.checkpoint_xml)(self.ptr, flags) };
        self.lib.owned_string(p, "checkpoint XML")
    }

    /// Deletes the checkpoint; libvirt merges its bitmap into its parent's, so the chain of
    /// every other checkpoint (other tools' too) stays whole.
    pub fn delete(&self, flags: c_uint) -> Result<(), LibvirtError> {
        // SAFETY: a live checkpoint.
        let rc = unsafe { (self.lib.fns.checkpoint_delete)(self.ptr, flags) };
        self.lib.check(rc, "delete the checkpoint").map(|_| ())
    }
}

impl Drop for Checkpoint {
    fn drop(&mut self) {
        // SAFETY: `ptr` is ours and released once.
        unsafe { (self.lib.fns.checkpoint_free)(self.ptr) };
    }
}
