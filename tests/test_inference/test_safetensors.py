"""logger.save_format: safetensors, and every loader of ours reading .pth and .safetensors alike."""
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_convert_dan import random_official
from test_model import in_process_opt

from basicsr.models import build_model
from d2c_arch import D2CNet
from d2c_deploy import spandrel_util
from d2c_inference.checkpoint_util import existing_weights_file, load_checkpoint, load_model, save_checkpoint
from d2c_tools import convert_dan
from d2c_tools import infer as infer_tool
from d2c_tools import summary as summary_tool
from d2c_tools.pipeline_util import load_latest_training_state
from d2c_utils.errors import UserError

TINY = {'num_feat': 8, 'num_group': 1, 'num_block': 1, 'reduction': 4, 'upscale': 4}


def test_save_and_load_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    params, ema = D2CNet(**TINY).state_dict(), D2CNet(**TINY).state_dict()
    obj = {'params': params, 'params_ema': ema, 'network_g': dict(TINY, type='D2CNet'), 'converted_from': {'a': 1}}
    for name in ('net.pth', 'net.safetensors'):
        save_checkpoint(obj, str(tmp_path / name), metadata={'provenance': {'iter': 3}})
        ckpt = load_checkpoint(str(tmp_path / name))
        assert ckpt['network_g'] == obj['network_g'] and ckpt['converted_from'] == {'a': 1}
        assert ckpt['metadata'] == {'provenance': {'iter': 3}}
        for key in ('params', 'params_ema'):
            assert ckpt[key].keys() == obj[key].keys()
            assert all(torch.equal(ckpt[key][k], v) for k, v in obj[key].items())
    # the file's kind is read from its bytes: a safetensors file named .pth loads too
    os.replace(tmp_path / 'net.safetensors', tmp_path / 'renamed.pth')
    assert torch.equal(load_checkpoint(str(tmp_path / 'renamed.pth'))['params']['head.weight'], params['head.weight'])
    # the layout is flat names, readable by any safetensors reader
    save_checkpoint(obj, str(tmp_path / 'net.safetensors'))
    assert set(load_file(str(tmp_path / 'net.safetensors'))) == {f'params.{k}'
                                                                 for k in params} | {f'params_ema.{k}'
                                                                                     for k in ema}


def test_foreign_and_broken_safetensors(tmp_path):
    # a bare state dict saved by another toolbox: load_model takes it as the network's weights
    torch.manual_seed(1)
    state = D2CNet(**TINY).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / 'bare.safetensors'))
    opt_file = tmp_path / 'opt.yml'
    opt_file.write_text(yaml.safe_dump({'network_g': dict(TINY, type='D2CNet')}))
    net, info = load_model(str(tmp_path / 'bare.safetensors'), str(opt_file))
    assert info['param_key'] is None and torch.equal(net.state_dict()['head.weight'], state['head.weight'])
    data = (tmp_path / 'bare.safetensors').read_bytes()
    (tmp_path / 'cut.safetensors').write_bytes(data[:len(data) // 2])
    with pytest.raises(UserError, match=r'cannot read .*cut.safetensors: corrupt or not a safetensors file'):
        load_checkpoint(str(tmp_path / 'cut.safetensors'))


def trained_model(tmp_path, tiny_data, fmt, **train):
    opt = in_process_opt(tmp_path, tiny_data, (('joint', 2), ), ema_decay=0.5, **train)
    opt['logger'] = {'save_format': fmt}
    opt['path']['models'] = str(tmp_path / fmt / 'models')
    opt['path']['training_states'] = str(tmp_path / fmt / 'training_states')
    os.makedirs(opt['path']['models'])
    os.makedirs(opt['path']['training_states'])
    model = build_model(opt)
    gen = torch.Generator().manual_seed(0)
    for it in (1, 2):
        model.update_learning_rate(it)
        model.feed_data({'lq': torch.rand(2, 3, 4, 4, generator=gen), 'gt': torch.rand(2, 3, 16, 16, generator=gen)})
        model.optimize_parameters(it)
    model.save(epoch=0, current_iter=2)
    return model


def test_training_writes_safetensors_that_every_loader_reads(tmp_path, tiny_data, capsys):
    model = trained_model(tmp_path, tiny_data, 'safetensors')
    models = model.opt['path']['models']
    assert sorted(os.listdir(models)) == ['net_g_2.safetensors']
    path = os.path.join(models, 'net_g_2.safetensors')
    ckpt = load_checkpoint(path)
    bare = model.get_bare_model(model.net_g)
    assert all(torch.equal(ckpt['params'][k], v) for k, v in bare.state_dict().items())
    assert 'params_ema' in ckpt and ckpt['network_g']['num_feat'] == 8
    provenance = ckpt['metadata']['provenance']
    assert provenance['iter'] == 2 and provenance['model_type'] == 'D2CModel' and provenance['versions']['torch']
    assert ckpt['metadata']['options']['train']['ema_decay'] == 0.5
    # the training state stays BasicSR's .state
    assert os.listdir(model.opt['path']['training_states']) == ['2.state']

    # d2c-infer / d2c-export's loader: no --opt needed, the file carries network_g
    net, info = load_model(path)
    assert info['param_key'] == 'params_ema' and 'carried options' in info['opt_source']
    ema = model.get_bare_model(model.net_g_ema).state_dict()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in ema.items())
    # d2c-summary and d2c-infer end to end
    assert summary_tool.main(['--model', path]) == 0
    assert 'D2CNet' in capsys.readouterr().out
    import cv2
    import numpy as np
    cv2.imwrite(str(tmp_path / 'lr.png'), (np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8))
    rc = infer_tool.main(
        ['-i', str(tmp_path / 'lr.png'), '-o',
         str(tmp_path / 'out'), '--model', path, '-q', '--backend', 'torch'])
    assert rc == 0 and os.listdir(tmp_path / 'out') == ['lr_out.png']
    # spandrel (chaiNNer, ComfyUI) reads the flat names
    spandrel = pytest.importorskip('spandrel')
    registry = spandrel_util.install(spandrel.ArchRegistry())
    descriptor = spandrel.ModelLoader(registry=registry).load_from_file(path)
    assert all(torch.equal(descriptor.model.state_dict()[k], v) for k, v in ema.items())

    # training from it (path.pretrain_network_g), and BasicSR's resume name net_g_<iter>.pth finds it
    assert existing_weights_file(os.path.join(models, 'net_g_2.pth')) == path
    opt = in_process_opt(tmp_path, tiny_data, (('joint', 2), ))
    opt['path']['pretrain_network_g'] = os.path.join(models, 'net_g_2.pth')
    opt['path']['param_key_g'] = 'params'
    fresh = build_model(opt)
    assert all(torch.equal(fresh.get_bare_model(fresh.net_g).state_dict()[k], v) for k, v in ckpt['params'].items())
    # --auto_resume accepts a state whose network is a .safetensors file
    state_path, state = load_latest_training_state({'path': model.opt['path'], 'num_gpu': 0})
    assert state_path.endswith('2.state') and state['iter'] == 2


def test_pth_format_stays_basicsr(tmp_path, tiny_data):
    model = trained_model(tmp_path, tiny_data, 'pth')
    ckpt = torch.load(os.path.join(model.opt['path']['models'], 'net_g_2.pth'), weights_only=True)
    assert sorted(ckpt) == ['params', 'params_ema']


def test_bad_save_format(tmp_path, tiny_data):
    opt = in_process_opt(tmp_path, tiny_data, (('joint', 2), ))
    opt['logger'] = {'save_format': 'ckpt'}
    with pytest.raises(UserError, match=r"logger.save_format='ckpt'; use one of \('pth', 'safetensors'\)"):
        build_model(opt)


def test_converter_writes_safetensors_that_loads_like_its_pth(tmp_path, capsys):
    torch.save(random_official(4, seed=4), tmp_path / 'official.pth')
    for name in ('dan.pth', 'dan.safetensors'):
        assert convert_dan.main([str(tmp_path / 'official.pth'), str(tmp_path / name)]) == 0
    capsys.readouterr()
    pth, pth_info = load_model(str(tmp_path / 'dan.pth'))
    st, st_info = load_model(str(tmp_path / 'dan.safetensors'))
    assert st_info['net_opt'] == pth_info['net_opt']
    assert all(torch.equal(st.state_dict()[k], v) for k, v in pth.state_dict().items())
    assert load_checkpoint(str(tmp_path / 'dan.safetensors'))['converted_from']['tool'] == 'd2c-convert-dan'
