"""Load the checkpoint --resume names, then save it again at once, in this version's format.

    mpiexec -n N python load_and_save.py [trainer flags...]
"""
import sys

from mpitrain import api, compress, train
from mpitrain.comm import World
from mpitrain.config import Parser, add_arguments, resolve

world = World()
parser = Parser()
add_arguments(parser, compress.names())
cfg = resolve(parser.parse_args(sys.argv[1:]), compressors=compress.names())
run = train.prepare(cfg, world)
resumed = api.load_checkpoint(run.exchange, run.optimizer, cfg.resume, cfg.run_dir)
api.save_checkpoint(cfg.run_dir, resumed.step, run.exchange, run.optimizer, epoch=resumed.epoch, background=False)
