import pytest

from sdtune.memory import estimate

# (setting, estimate kwargs, peak GiB measured on an H200 and recorded in bench/RESULTS.md)
MEASURED = [
    ("sd15 512 b1 fp16", dict(unet_params=859_520_964, frozen_on_gpu_params=123_060_480 + 83_653_863,
                              fp32_on_gpu_params=0, batch=1, latent_pixels=64 * 64, gc=False), 3.19),
    ("sd15 512 b4 fp16", dict(unet_params=859_520_964, frozen_on_gpu_params=123_060_480 + 83_653_863,
                              fp32_on_gpu_params=0, batch=4, latent_pixels=64 * 64, gc=False), 6.43),
    ("sdxl 1024 b1 fp16 gc", dict(unet_params=2_567_463_684, frozen_on_gpu_params=123_060_480 + 694_659_840,
                                  fp32_on_gpu_params=83_653_863, batch=1, latent_pixels=128 * 128, gc=True), 9.85),
]


@pytest.mark.parametrize("name,kw,measured", MEASURED, ids=[m[0] for m in MEASURED])
def test_estimate_is_within_15_percent_of_measured_peaks(name, kw, measured):
    est = estimate(
        unet_params=kw["unet_params"], frozen_on_gpu_params=kw["frozen_on_gpu_params"],
        fp32_on_gpu_params=kw["fp32_on_gpu_params"], trainable_params=800_000, weight_bytes=2,
        images_per_micro_batch=kw["batch"], latent_pixels=kw["latent_pixels"], gradient_checkpointing=kw["gc"],
        optimizer="adamw8bit",
    )
    assert abs(est.total_gib - measured) / measured < 0.15, (est, measured)
    assert "GiB peak GPU memory" in est.line()
