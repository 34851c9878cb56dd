"""Stub of modules/util.py (WebUI v1.10.1): the file lister extra-network pages use."""
import os


class MassFileLister:
    def exists(self, path):
        return os.path.exists(path)

    def mctime(self, path):
        try:
            st = os.stat(path)
        except OSError:
            return 0, 0
        return st.st_mtime, st.st_ctime

    def reset(self):
        pass

    def update_file_entry(self, path):
        pass
