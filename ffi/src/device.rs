//! Devices, the opened context, ports and GIDs.

use std::ffi::CStr;
use std::fmt;
use std::sync::Arc;

use rdma_sys::*;

use crate::error::{call, last_errno, VerbsError};

/// Names of the RDMA devices on this machine, or [`VerbsError::NoDevice`].
pub fn device_names() -> Result<Vec<String>, VerbsError> {
    let mut n = 0;
    // SAFETY: `n` is a valid out-pointer; the returned array is freed below, before returning.
    let list = unsafe { ibv_get_device_list(&mut n) };
    if list.is_null() {
        let e = std::io::Error::from_raw_os_error(last_errno());
        return Err(VerbsError::NoDevice(format!(
            "ibv_get_device_list failed: {e} (this kernel has no RDMA support, or ib_uverbs is not loaded)"
        )));
    }
    let mut names = Vec::with_capacity(n.max(0) as usize);
    for i in 0..n.max(0) as usize {
        // SAFETY: `list` holds `n` valid device pointers; each name is a NUL-terminated string
        // owned by the device, copied before the list is freed.
        let name = unsafe { CStr::from_ptr(ibv_get_device_name(*list.add(i))) };
        names.push(name.to_string_lossy().into_owned());
    }
    // SAFETY: `list` came from ibv_get_device_list and is freed exactly once.
    unsafe { ibv_free_device_list(list) };
    if names.is_empty() {
        return Err(VerbsError::NoDevice(
            "no RDMA devices (`ibv_devices` lists none)".into(),
        ));
    }
    Ok(names)
}

pub(crate) struct ContextInner {
    pub(crate) ctx: *mut ibv_context,
    pub(crate) name: String,
}

// SAFETY: libibverbs contexts are thread-safe; the pointer is only freed in Drop.
unsafe impl Send for ContextInner {}
// SAFETY: as above: every verbs call on a context may be made from any thread.
unsafe impl Sync for ContextInner {}

impl Drop for ContextInner {
    fn drop(&mut self) {
        // SAFETY: every child (PD, CQ, QP, MR) holds an Arc to this context, so none is left.
        unsafe { ibv_close_device(self.ctx) };
    }
}

/// An opened RDMA device. Protection domains and completion queues keep it alive.
#[derive(Clone)]
pub struct Context {
    pub(crate) inner: Arc<ContextInner>,
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("device", &self.inner.name)
            .finish()
    }
}

/// A port's state as the driver reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortInfo {
    /// `ibv_port_state` (4 is active).
    pub state: u32,
    /// Active MTU as the `ibv_mtu` enum (3 is 1024 bytes).
    pub active_mtu: u32,
    /// Local identifier (0 on RoCE).
    pub lid: u16,
    /// Entries in the GID table.
    pub gid_table_len: i32,
}

impl PortInfo {
    /// Whether the port can carry traffic.
    pub fn is_active(&self) -> bool {
        self.state == ibv_port_state::IBV_PORT_ACTIVE
    }

    fn state_name(&self) -> String {
        match self.state {
            ibv_port_state::IBV_PORT_DOWN => "down".into(),
            ibv_port_state::IBV_PORT_INIT => "initializing".into(),
            ibv_port_state::IBV_PORT_ARMED => "armed".into(),
            ibv_port_state::IBV_PORT_ACTIVE => "active".into(),
            s => format!("in state {s}"),
        }
    }
}

/// A 16-byte global identifier (an IPv6 address; RoCEv2 IPv4 GIDs are `::ffff:a.b.c.d`).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Gid(pub [u8; 16]);

impl Gid {
    /// Whether this is an IPv4-mapped GID (`::ffff:a.b.c.d`), as RoCEv2 over IPv4 uses.
    pub fn is_ipv4_mapped(&self) -> bool {
        self.0[..10].iter().all(|&b| b == 0) && self.0[10] == 0xff && self.0[11] == 0xff
    }

    /// Whether the entry is empty.
    pub fn is_zero(&self) -> bool {
        self.0.iter().all(|&b| b == 0)
    }
}

impl fmt::Debug for Gid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Gid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        std::net::Ipv6Addr::from(self.0).fmt(f)
    }
}

impl Context {
    /// Opens the device called `name`, or the first one when `None`.
    pub fn open(name: Option<&str>) -> Result<Context, VerbsError> {
        let names = device_names()?;
        let idx = match name {
            None => 0,
            Some(want) => names.iter().position(|n| n == want).ok_or_else(|| {
                VerbsError::NoDevice(format!(
                    "no device called {want} (this machine has: {})",
                    names.join(", ")
                ))
            })?,
        };
        let mut n = 0;
        // SAFETY: as in `device_names`; the list is freed below, after the device is opened
        // (an opened context stays valid after the list is freed).
        let list = unsafe { ibv_get_device_list(&mut n) };
        if list.is_null() || idx >= n as usize {
            if !list.is_null() {
                // SAFETY: freed once, as returned by ibv_get_device_list.
                unsafe { ibv_free_device_list(list) };
            }
            return Err(VerbsError::NoDevice(
                "the device list changed while opening".into(),
            ));
        }
        // SAFETY: idx < n, so the entry is a valid device.
        let ctx = unsafe { ibv_open_device(*list.add(idx)) };
        let errno = last_errno();
        // SAFETY: freed once; the opened context does not depend on the list.
        unsafe { ibv_free_device_list(list) };
        let name = names[idx].clone();
        if ctx.is_null() {
            return Err(call("ibv_open_device", &name, errno));
        }
        Ok(Context {
            inner: Arc::new(ContextInner { ctx, name }),
        })
    }

    /// The device's name, e.g. `mlx5_0` or `rxe0`.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Queries `port` (ports count from 1).
    pub fn port(&self, port: u8) -> Result<PortInfo, VerbsError> {
        // SAFETY: ibv_port_attr is plain data; zeroed is a valid value and the call fills it.
        let mut attr: ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: the context is open and `attr` is a valid out-pointer of the right type.
        let rc = unsafe { ___ibv_query_port(self.inner.ctx, port, &mut attr) };
        if rc != 0 {
            return Err(call(format!("ibv_query_port({port})"), self.name(), rc));
        }
        Ok(PortInfo {
            state: attr.state,
            active_mtu: attr.active_mtu,
            lid: attr.lid,
            gid_table_len: attr.gid_tbl_len,
        })
    }

    /// The port's info, or [`VerbsError::PortDown`] when it is not active.
    pub fn active_port(&self, port: u8) -> Result<PortInfo, VerbsError> {
        let info = self.port(port)?;
        if !info.is_active() {
            return Err(VerbsError::PortDown {
                device: self.name().to_string(),
                port,
                state: info.state_name(),
            });
        }
        Ok(info)
    }

    /// The GID at `index` of `port`; an empty entry is [`VerbsError::NoGid`].
    pub fn gid(&self, port: u8, index: u8) -> Result<Gid, VerbsError> {
        // SAFETY: ibv_gid is a plain 16-byte union; zeroed is valid and the call fills it.
        let mut gid: ibv_gid = unsafe { std::mem::zeroed() };
        // SAFETY: the context is open and `gid` is a valid out-pointer.
        let rc = unsafe { ibv_query_gid(self.inner.ctx, port, i32::from(index), &mut gid) };
        if rc != 0 {
            return Err(call(
                format!("ibv_query_gid({port}, {index})"),
                self.name(),
                last_errno(),
            ));
        }
        // SAFETY: both union members are plain bytes; `raw` covers all 16.
        let gid = Gid(unsafe { gid.raw });
        if gid.is_zero() {
            return Err(VerbsError::NoGid {
                device: self.name().to_string(),
                port,
                what: format!("GID index {index} has no address"),
            });
        }
        Ok(gid)
    }

    /// The first IPv4-mapped RoCE v2 GID of `port` (its index and value): what RoCE needs to
    /// route over IPv4. On InfiniBand, use index 0 instead.
    pub fn roce_v2_ipv4_gid(&self, port: u8) -> Result<(u8, Gid), VerbsError> {
        let len = self.port(port)?.gid_table_len.clamp(0, 256) as usize;
        for index in 0..len {
            let Ok(gid) = self.gid(port, index as u8) else {
                continue;
            };
            let types = format!(
                "/sys/class/infiniband/{}/ports/{port}/gid_attrs/types/{index}",
                self.name()
            );
            // Where the kernel tells the GID type, insist on v2; otherwise trust the address.
            let v2 = std::fs::read_to_string(types).map_or(true, |t| t.contains("v2"));
            if gid.is_ipv4_mapped() && v2 {
                return Ok((index as u8, gid));
            }
        }
        Err(VerbsError::NoGid {
            device: self.name().to_string(),
            port,
            what: "no RoCE v2 GID with an IPv4 address (is the netdev up with an IPv4 address?)"
                .into(),
        })
    }
}
