//! Finding a Vulkan adapter for the tests that run CubeCL kernels through Burn's wgpu backend.

use burn::backend::wgpu::WgpuDevice;

/// The wgpu device for kernel tests, after checking that a Vulkan adapter exists.
///
/// On a machine without a GPU the adapter is Mesa's software Vulkan (lavapipe, Debian/Ubuntu
/// package `mesa-vulkan-drivers`). Without any adapter this returns `None` with a message on
/// stderr, so `cargo test --workspace` passes on a fresh machine, unless
/// `FASTLORA_REQUIRE_WGPU=1` is set (CI sets it after installing lavapipe).
///
/// # Panics
/// If no adapter exists and `FASTLORA_REQUIRE_WGPU=1`.
pub fn vulkan_test_device() -> Option<WgpuDevice> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: wgpu::Backends::VULKAN,
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    let adapters = cubecl::future::block_on(instance.enumerate_adapters(wgpu::Backends::VULKAN));
    if adapters.is_empty() {
        let message = "no Vulkan adapter found: the CubeCL kernel tests run on Burn's wgpu \
                       backend. On a machine without a GPU install Mesa's software Vulkan \
                       (lavapipe): `apt-get install -y mesa-vulkan-drivers` (Debian/Ubuntu).";
        assert!(
            !std::env::var("FASTLORA_REQUIRE_WGPU").is_ok_and(|v| v == "1"),
            "{message} (FASTLORA_REQUIRE_WGPU=1 is set)"
        );
        eprintln!("skipping: {message}");
        return None;
    }
    for adapter in &adapters {
        let info = adapter.get_info();
        eprintln!("Vulkan adapter: {} ({:?})", info.name, info.device_type);
    }
    // DefaultDevice takes the best adapter, a CPU one (lavapipe) when there is nothing else.
    Some(WgpuDevice::DefaultDevice)
}
