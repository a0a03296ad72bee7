import pytest

from sdtune.memory import estimate

SD15_UNET, SDXL_UNET = 859_520_964, 2_567_463_684
CLIP_L, BIG_G, VAE = 123_060_480, 694_659_840, 83_653_863

# (setting, estimate arguments, peak GiB measured on an H200 as recorded in bench/RESULTS.md)
MEASURED = [
    # first run: latents encoded every step, VAE and text encoders on the GPU
    ("sd15 512 b1 uncached", dict(unet=SD15_UNET, frozen=CLIP_L + VAE, fp32=0, batch=1, res=512, gc=False,
                                  cached=False, vae_bytes=2), 3.19),
    ("sd15 512 b4 uncached", dict(unet=SD15_UNET, frozen=CLIP_L + VAE, fp32=0, batch=4, res=512, gc=False,
                                  cached=False, vae_bytes=2), 6.43),
    ("sdxl 1024 b1 gc uncached", dict(unet=SDXL_UNET, frozen=CLIP_L + BIG_G, fp32=VAE, batch=1, res=1024, gc=True,
                                      cached=False, vae_bytes=4), 9.85),
    # second run: cached latents and text, VAE and text encoders moved off the GPU
    ("sd15 512 b1 cached", dict(unet=SD15_UNET, frozen=0, fp32=0, batch=1, res=512, gc=False, cached=True,
                                vae_bytes=2), 2.78),
    ("sd15 512 b4 cached", dict(unet=SD15_UNET, frozen=0, fp32=0, batch=4, res=512, gc=False, cached=True,
                                vae_bytes=2), 6.03),
    ("sdxl 1024 b1 gc cached", dict(unet=SDXL_UNET, frozen=0, fp32=0, batch=1, res=1024, gc=True, cached=True,
                                    vae_bytes=4), 5.68),
]


@pytest.mark.parametrize("name,kw,measured", MEASURED, ids=[m[0] for m in MEASURED])
def test_estimate_is_within_15_percent_of_measured_peaks(name, kw, measured):
    est = estimate(
        unet_params=kw["unet"], frozen_on_gpu_params=kw["frozen"], fp32_on_gpu_params=kw["fp32"],
        trainable_params=800_000, weight_bytes=2, images_per_micro_batch=kw["batch"], resolution=kw["res"],
        gradient_checkpointing=kw["gc"], optimizer="adamw8bit", latents_cached=kw["cached"],
        vae_bytes=kw["vae_bytes"],
    )
    assert abs(est.total_gib - measured) / measured < 0.15, (est.total_gib, measured)
    assert "GiB peak GPU memory" in est.line()


def test_a_family_without_measured_constants_says_its_activations_are_a_guess():
    from sdtune.families import MemoryConstants, get

    kw = dict(unet_params=12_000_000_000, frozen_on_gpu_params=0, fp32_on_gpu_params=0, trainable_params=10**7,
              weight_bytes=2, images_per_micro_batch=1, resolution=1024, gradient_checkpointing=True,
              optimizer="adamw", latents_cached=True)
    assert "+-30%" in estimate(**kw).line() and "guess" not in estimate(**kw).line()
    for family in ("flux", "sd3"):
        line = estimate(**kw, constants=get(family).memory).line()
        assert "not measured for this family" in line and "+-30%" not in line
    assert get("sdxl").memory == MemoryConstants()
