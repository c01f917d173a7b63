from setuptools import find_packages, setup

setup(
    name="emond",
    version="0.1.0",
    description="An ingest-and-storage backend compatible with emoncms.org, on Twisted",
    python_requires=">=3.11",
    packages=find_packages(include=["emond", "emond.*"]) + ["twisted.plugins"],
    package_data={"twisted": ["plugins/emond_plugins.py"], "emond.web": ["templates/*.html", "static/*"]},
    install_requires=[
        "twisted[tls]>=23.10",
        "txredisapi>=1.4.10",
        "pymysql>=1.1",
        "service-identity>=21.1",
        "pyopenssl>=23.2",
        "numpy>=1.26",
        "msgpack>=1.0",
        "prometheus-client>=0.17",
        "orjson>=3.9",  # bulk frames decoded 4-5x faster than json.loads (emond/inputparse.py _decode)
        "httptools>=0.6",  # the lean HTTP/1.1 protocol of the input routes (emond/web/lean.py): heads parsed in C
        "rich>=13.0",  # emond-admin import: the progress bar
        "sdnotify>=0.3.2",  # sd_notify(3) to systemd (Type=notify, WatchdogSec)
    ],
    entry_points={"console_scripts": ["emond-admin = emond.app.admin:main"]},
    extras_require={"test": ["treq>=23.1", "hypothesis>=6.100", "import-linter>=2.1"]},
)
