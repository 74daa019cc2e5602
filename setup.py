from setuptools import find_packages, setup

setup(
    name="l2pd",
    version="0.1.0",
    description="Learned parallel decoding, end-of-text prediction and block KV caching for diffusion LMs "
    "(LLaDA, Dream)",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["l2pd", "l2pd.*", "l2pd_kernels", "l2pd_kernels.*"]),
    package_data={"l2pd.demo": ["assets/*", "assets/*/*", "assets/*/*/*"],
                  "l2pd": ["lm_eval_tasks/*.yaml", "lm_eval_tasks/*.py"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.5",
        "transformers>=4.44",
        "safetensors",
        "tokenizers",
        "tqdm",
        "numpy",
        "triton; platform_system == 'Linux'",
    ],
    extras_require={"test": ["pytest", "pytest-benchmark", "pytest-xdist", "hypothesis", "matplotlib",
                                      "fastapi", "uvicorn", "prometheus_client", "openai"], "eval": ["lm-eval>=0.4.8"],
                    "plot": ["matplotlib"], "serve": ["fastapi", "uvicorn", "prometheus_client"]},
    entry_points={"console_scripts": ["l2pd = l2pd.cli:main"]},
)
