//! llama.cpp's RPC backend: devices on other machines that the model's
//! layers are spread over (`hearth serve --rpc`), and the worker that
//! offers this machine's devices to such a server (`hearth rpc-worker`).
//!
//! Both entry points are looked up in the RPC backend's registry entry
//! (`ggml_backend_reg_get_proc_address`), as llama.cpp's own tools do, so
//! a build without the backend says so instead of failing to link.

use std::ffi::{c_char, CString};
use std::path::Path;

use llama_cpp_sys_2 as sys;

use super::log::init_backend;

/// `ggml_backend_rpc_add_server` (ggml-rpc.h).
type AddServer = unsafe extern "C" fn(endpoint: *const c_char) -> sys::ggml_backend_reg_t;
/// `ggml_backend_rpc_start_server` (ggml-rpc.h).
type StartServer = unsafe extern "C" fn(
    endpoint: *const c_char,
    cache_dir: *const c_char,
    n_threads: usize,
    n_devices: usize,
    devices: *mut sys::ggml_backend_dev_t,
);

/// Why the RPC backend could not be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RpcError {
    #[error("this build has no RPC backend (llama.cpp built without GGML_RPC=ON)")]
    NoBackend,
    #[error("RPC worker {0} offers no devices")]
    NoDevices(String),
    #[error("bad RPC endpoint {0:?}")]
    BadEndpoint(String),
    #[error("cannot serve RPC on {0} (is the address this machine's, and the port free?)")]
    CannotServe(String),
}

/// The named entry point of the RPC backend.
fn proc_address(name: &str) -> Result<*mut std::ffi::c_void, RpcError> {
    init_backend();
    let rpc = CString::new("RPC").expect("no NUL");
    let name = CString::new(name).expect("no NUL");
    // SAFETY: both strings are NUL-terminated and outlive the calls; the
    // registry is initialised by `init_backend`, and a null entry (no such
    // backend or function) is handled.
    unsafe {
        let reg = sys::ggml_backend_reg_by_name(rpc.as_ptr());
        if reg.is_null() {
            return Err(RpcError::NoBackend);
        }
        let f = sys::ggml_backend_reg_get_proc_address(reg, name.as_ptr());
        if f.is_null() {
            return Err(RpcError::NoBackend);
        }
        Ok(f)
    }
}

/// Register the devices of the RPC workers at `endpoints` (`HOST:PORT`),
/// so a model loaded afterwards spreads its layers over them. Each worker
/// must be reachable: llama.cpp aborts the process when it cannot connect
/// (see [`crate::engine::rpc::wait_for_workers`]). Returns each worker's
/// device names.
pub fn add_servers(endpoints: &[String]) -> Result<Vec<Vec<String>>, RpcError> {
    let f = proc_address("ggml_backend_rpc_add_server")?;
    // SAFETY: the registry returns this name's function, whose signature
    // is ggml-rpc.h's `ggml_backend_rpc_add_server`.
    let add: AddServer = unsafe { std::mem::transmute::<*mut std::ffi::c_void, AddServer>(f) };
    let mut names = Vec::new();
    for endpoint in endpoints {
        let c =
            CString::new(endpoint.as_str()).map_err(|_| RpcError::BadEndpoint(endpoint.clone()))?;
        // SAFETY: `c` is NUL-terminated and outlives the call; llama.cpp
        // keeps its own copy of the endpoint. A null registry entry (no
        // devices) is handled; a registered one lives for the process.
        let devices = unsafe {
            let reg = add(c.as_ptr());
            if reg.is_null() {
                return Err(RpcError::NoDevices(endpoint.clone()));
            }
            sys::ggml_backend_register(reg);
            (0..sys::ggml_backend_reg_dev_count(reg))
                .map(|i| {
                    let dev = sys::ggml_backend_reg_dev_get(reg, i);
                    std::ffi::CStr::from_ptr(sys::ggml_backend_dev_name(dev))
                        .to_string_lossy()
                        .into_owned()
                })
                .collect()
        };
        names.push(devices);
    }
    Ok(names)
}

/// Offer this machine's devices (its GPUs, else its CPU) to servers that
/// connect to `endpoint`, computing with `threads` CPU threads; `cache_dir`
/// keeps large tensors a server sent, so a restarted server's next load
/// sends only their hashes. Serves one server at a time, forever.
pub fn serve_worker(
    endpoint: &str,
    threads: usize,
    cache_dir: Option<&Path>,
) -> Result<(), RpcError> {
    let f = proc_address("ggml_backend_rpc_start_server")?;
    // SAFETY: as in `add_servers`, for `ggml_backend_rpc_start_server`.
    let start: StartServer =
        unsafe { std::mem::transmute::<*mut std::ffi::c_void, StartServer>(f) };
    let mut devices = local_devices();
    let c = CString::new(endpoint).map_err(|_| RpcError::BadEndpoint(endpoint.into()))?;
    let dir = cache_dir
        .map(|d| CString::new(d.as_os_str().as_encoded_bytes()))
        .transpose()
        .map_err(|_| RpcError::BadEndpoint(endpoint.into()))?;
    // SAFETY: the strings are NUL-terminated and outlive the call, which
    // only returns on failure; `devices` holds `devices.len()` device
    // handles from the registry, which live for the process.
    unsafe {
        start(
            c.as_ptr(),
            dir.as_ref().map_or(std::ptr::null(), |d| d.as_ptr()),
            threads,
            devices.len(),
            devices.as_mut_ptr(),
        );
    }
    Err(RpcError::CannotServe(endpoint.into()))
}

/// The devices a worker offers: every GPU this build drives, or the CPU
/// when there is none.
fn local_devices() -> Vec<sys::ggml_backend_dev_t> {
    init_backend();
    // SAFETY: the registry is initialised; each index below the count names
    // a registered device.
    unsafe {
        let all: Vec<_> = (0..sys::ggml_backend_dev_count())
            .map(|i| sys::ggml_backend_dev_get(i))
            .collect();
        let gpus: Vec<_> = all
            .iter()
            .copied()
            .filter(|&d| {
                let t = sys::ggml_backend_dev_type(d);
                t == sys::GGML_BACKEND_DEVICE_TYPE_GPU || t == sys::GGML_BACKEND_DEVICE_TYPE_IGPU
            })
            .collect();
        if gpus.is_empty() {
            all.into_iter()
                .filter(|&d| sys::ggml_backend_dev_type(d) == sys::GGML_BACKEND_DEVICE_TYPE_CPU)
                .take(1)
                .collect()
        } else {
            gpus
        }
    }
}

/// The most devices a model may be split over (`--tensor-split` entries).
pub fn max_devices() -> usize {
    // SAFETY: a constant getter.
    unsafe { sys::llama_max_devices() }
}
