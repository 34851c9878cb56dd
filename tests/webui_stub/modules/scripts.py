"""Stub of modules/scripts.py (WebUI v1.10.1): the Script base class for AlwaysVisible scripts."""
from modules import paths

AlwaysVisible = object()
scripts_txt2img = None   # the txt2img ScriptRunner once the UI is built; its infotext_fields list (component, key)


class Script:
    name = None
    section = None
    filename = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    group = None
    create_group = True
    infotext_fields = None
    paste_field_names = None
    setup_for_ui_only = False

    def title(self):
        raise NotImplementedError()

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def run(self, p, *args):
        pass

    def setup(self, p, *args):
        pass

    def before_process(self, p, *args):
        pass

    def process(self, p, *args):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def postprocess(self, p, processed, *args):
        pass


current_basedir = paths.script_path


def basedir():
    return current_basedir
