# mmengine config: SRVGGNetCompact x4 (realesr-animevideov3), W4A4 dual-region, tested on Set5 by OAQHook.
#
#   python -m oaq_plugin.mmengine_plugin.run options/mmengine_oaq_srvgg_x4.py --work-dir results/mmengine_srvgg
#
# Calibration reads SunHays80 LR images only (never the test set). The shared data folder is
# $OAQ_SHARED, else ../shared beside the checkout, so the config works from any directory.

# mmengine treats a config holding an `import` statement as a lazy-import config, in which calls are not
# allowed; __import__ keeps this a plain config whose paths are computed when it is read.
shared = str(__import__('oaq_plugin.paths', fromlist=['shared_root']).shared_root())
set5 = f'{shared}/data/benchmark/Set5'
scale = 4

custom_imports = dict(imports=['oaq_plugin.mmengine_plugin'], allow_failed_imports=False)

model = dict(
    type='SuperResolutionModel',
    # A BasicSR architecture: built through BasicSR's ARCH_REGISTRY, the same as `network_g`.
    generator=dict(type='SRVGGNetCompact', num_in_ch=3, num_out_ch=3, num_feat=64, num_conv=16, upscale=scale,
                   act_type='prelu'),
    pretrained=f'{shared}/weights/SRVGGNetCompact/realesr-animevideov3.pth',
    param_key='params',
    data_preprocessor=dict(type='SRDataPreprocessor'))

test_dataloader = dict(
    batch_size=1,  # Set5 images differ in size
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='pseudo_collate'),
    dataset=dict(
        type='PairedImageDataset',
        data_root=set5,
        data_prefix=dict(lq=f'LR_bicubic/X{scale}', gt='HR'),
        filename_tmpl=f'{{}}x{scale}',
        scale=scale,
        name='Set5'))
test_evaluator = [dict(type='PSNRMetric', crop_border=scale), dict(type='SSIMMetric', crop_border=scale)]
test_cfg = dict(type='TestLoop')

custom_hooks = [
    dict(
        type='OAQHook',
        # Everything not named here is OAQConfig's default (oaq_plugin/config.py).
        oaq=dict(w_bits=4, a_bits=4, act_quantizer='dual_region', protocol='full'),
        calib_dataloader=dict(
            num_workers=0,
            collate_fn=dict(type='pseudo_collate'),
            dataset=dict(
                type='PairedImageDataset',
                data_root=f'{shared}/data/calib/SunHays80',
                data_prefix=dict(lq=f'LR_bicubic/X{scale}'),
                name='SunHays80')),
        attribute='generator'),
]

default_scope = None
default_hooks = dict(
    runtime_info=dict(type='RuntimeInfoHook'),
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=1))
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork'), dist_cfg=dict(backend='nccl'))
launcher = 'none'
randomness = dict(seed=0)
log_level = 'INFO'
work_dir = 'results/mmengine_srvgg'
