"""d2c-sr: D2C-SR (divergence to convergence real-world super-resolution) as a BasicSR plugin."""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
AUTOLOAD_PTH = 'd2c_sr_autoload.pth'


class BuildPyWithAutoload(build_py):
    """Also put ``d2c_sr_autoload.pth`` at the top of site-packages (see d2c_autoload.py).

    A normal build copies it into build_lib, whose content becomes site-packages. An
    editable build (``pip install -e .``) throws build_lib away and installs only the
    wheel that ``install_lib`` points at, so there the file goes straight into that wheel.
    """

    def run(self):
        super().run()
        if getattr(self, 'editable_mode', False):
            target_dir = self.get_finalized_command('install').install_lib
        else:
            target_dir = self.build_lib
        self.mkpath(target_dir)
        self.copy_file(os.path.join(HERE, AUTOLOAD_PTH), os.path.join(target_dir, AUTOLOAD_PTH))


def read(name):
    with open(os.path.join(HERE, name), encoding='utf-8') as f:
        return f.read()


setup(
    name='d2c-sr',
    version='0.1.0',
    description='D2C-SR real-world image super-resolution as a BasicSR plugin',
    long_description=read('README.md'),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.8',
    packages=[
        'd2c_utils', 'd2c_arch', 'd2c_data', 'd2c_losses', 'd2c_metrics', 'd2c_inference', 'd2c_convert', 'd2c_deploy',
        'd2c_model', 'd2c_tools'
    ],
    py_modules=['d2c_compat', 'd2c_autoload'],
    cmdclass={'build_py': BuildPyWithAutoload},
    # safetensors: logger.save_format: safetensors and reading such files in every loader (no pickle, no code)
    install_requires=[
        'basicsr>=1.4.2', 'torch', 'torchvision', 'opencv-python>=4.5,<5', 'pyyaml', 'lmdb', 'safetensors>=0.4'
    ],
    # the lint tools are pinned so that `make lint` gives the same verdict everywhere; yapf comes with basicsr
    # onnx: d2c-export and `d2c-infer --backend onnxruntime`; openvino: `--backend openvino` (the fastest measured
    # on CPUs, what `--backend auto` takes when installed); spandrel: loading D2C checkpoints in chaiNNer / ComfyUI;
    # perceptual: the LPIPS (lpips, the reference implementation the paper's Table 2 used) and DISTS (piq) metrics
    extras_require={
        'test': ['pytest', 'ruff==0.17.6', 'yapf==0.43.0'],
        'onnx': ['onnx>=1.16', 'onnxscript>=0.3', 'onnxruntime>=1.18'],
        'openvino': ['openvino>=2024.0', 'onnx>=1.16', 'onnxscript>=0.3'],
        'spandrel': ['spandrel>=0.4'],
        'perceptual': ['lpips>=0.1.4', 'piq>=0.8'],
    },
    entry_points={
        'console_scripts': [
            'd2c-train=d2c_tools.train:main',
            'd2c-test=d2c_tools.test:main',
            'd2c-infer=d2c_tools.infer:main',
            'd2c-summary=d2c_tools.summary:main',
            'd2c-convert-official=d2c_tools.convert_official:main',
            'd2c-swap=d2c_tools.swap:main',
            'd2c-export=d2c_tools.export:main',
            'd2c-convert-dan=d2c_tools.convert_dan:main',
            'd2c-convert-sdflow=d2c_tools.convert_sdflow:main',
        ],
    },
    classifiers=[
        'Programming Language :: Python :: 3',
        'Topic :: Scientific/Engineering :: Image Processing',
    ],
)
